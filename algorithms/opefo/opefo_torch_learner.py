"""OPEFOTorchLearner: GRPO's learner with the configured balance rule (``balance_mode``, one of
the rules registered in core/balance.py) in place of GRPO's w = 1."""

from __future__ import annotations

from opefo_rllib.algorithms.grpo.grpo_torch_learner import GRPOTorchLearner
from opefo_rllib.core.balance import BalanceRule, make_balance_rule

__all__ = ["OPEFOTorchLearner"]


class OPEFOTorchLearner(GRPOTorchLearner):
    balances_entropy_flow = True

    def make_balance_rule(self) -> BalanceRule:
        return make_balance_rule(self.config.balance_mode, self.config)
