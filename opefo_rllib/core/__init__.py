"""The math of GRPO and OPEFO, one layer that imports only torch and the standard library.

Per-token stats (``token_stats``), entropy-flow estimators and the flow totals
(``entropy_flow``), the registered balance rules (``balance``) and their weights
(``entropy_flow``), the adaptive entropy coefficient (``entropy_control``), group advantages
(``advantages``), the registered policy losses and loss aggregation (``policy_losses``), the
OPEFO loss (``opefo_loss``) and the parameter-space balance (``param_balance``). The equations
are in docs/algorithm.md. Nothing here knows about Ray, RLlib, engines or configs.
"""

from opefo_rllib.core.advantages import ADV_ESTIMATORS, get_adv_est, group_advantages, register_adv_est
from opefo_rllib.core.balance import BALANCE_RULES, BalanceRule, get_balance_rule, register_balance_rule
from opefo_rllib.core.entropy_flow import (
    BALANCE_MODES,
    ESTIMATORS,
    FlowTotals,
    balance_lambda,
    balance_weights,
    entropy_flow,
    flow_diagnostics,
    flow_totals,
    is_one_sided,
    lambda_star,
)
from opefo_rllib.core.opefo_loss import opefo_loss
from opefo_rllib.core.policy_losses import (
    AGG_MODES,
    POLICY_LOSS_SETTINGS,
    POLICY_LOSSES,
    PolicyLossConfig,
    aggregate_loss,
    entropy_bonus,
    get_policy_loss,
    loss_settings,
    policy_loss,
    register_policy_loss,
    token_covariance,
)
from opefo_rllib.core.token_stats import TokenStats, token_stats, token_stats_from_hidden

__all__ = [
    "ADV_ESTIMATORS", "AGG_MODES", "BALANCE_MODES", "BALANCE_RULES", "BalanceRule", "get_balance_rule",
    "register_balance_rule", "ESTIMATORS", "POLICY_LOSSES", "POLICY_LOSS_SETTINGS",
    "FlowTotals", "PolicyLossConfig", "TokenStats",
    "aggregate_loss", "balance_lambda", "balance_weights", "entropy_bonus", "entropy_flow", "flow_diagnostics",
    "flow_totals", "get_adv_est", "get_policy_loss", "group_advantages", "is_one_sided", "lambda_star",
    "loss_settings", "opefo_loss", "policy_loss", "register_adv_est", "register_policy_loss", "token_covariance",
    "token_stats", "token_stats_from_hidden",
]
