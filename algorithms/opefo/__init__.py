"""OPEFO: On-Policy Entropy Flow Optimization (arXiv 2605.11491).

The math (imports only torch): per-token stats, entropy-flow estimators, balancing weights, loss.
``OPEFO`` and ``OPEFOConfig`` (the RLlib algorithm, which imports Ray) load on first use.
"""

from opefo_rllib.algorithms.opefo.entropy_flow import (
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
from opefo_rllib.algorithms.opefo.loss import opefo_loss
from opefo_rllib.algorithms.opefo.token_stats import TokenStats, token_stats, token_stats_from_hidden

__all__ = [
    "OPEFO",
    "OPEFOConfig",
    "BALANCE_MODES",
    "ESTIMATORS",
    "FlowTotals",
    "TokenStats",
    "balance_lambda",
    "balance_weights",
    "entropy_flow",
    "flow_diagnostics",
    "flow_totals",
    "is_one_sided",
    "lambda_star",
    "opefo_loss",
    "token_stats",
    "token_stats_from_hidden",
]


def __getattr__(name: str):
    # The RLlib classes import Ray; the math above does not, so they load on first use.
    if name in ('OPEFO', 'OPEFOConfig'):
        import importlib

        return getattr(importlib.import_module("opefo_rllib.algorithms.opefo.opefo"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
