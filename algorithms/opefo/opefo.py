"""OPEFO as a native RLlib algorithm: OPEFOConfig and OPEFO.

OPEFO is GRPO (strict on-policy, ``policy_loss="pg"``) whose per-token loss is multiplied by
the entropy-flow balancing weights of ``entropy_flow.py``; everything else (sampling, group
advantages, one optimizer step per batch) is GRPO's. All balancing modes are settings, so the
paper's ablations are configs: ``balance_mode`` = "two_sided" (OPEFO), "increase_only",
"decrease_only", "static" (with ``static_lambda``), "none" (= strict GRPO).
"""

from __future__ import annotations

from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.utils.annotations import override

from opefo_rllib.algorithms.grpo.grpo import GRPO, GRPOConfig

__all__ = ["OPEFOConfig", "OPEFO"]


class OPEFOConfig(GRPOConfig):
    """GRPOConfig with OPEFO's balancing on (two-sided, exact estimator).

    Example:
        >>> config = OPEFOConfig().entropy_flow(estimator="exact", balance_mode="two_sided")
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or OPEFO)
        self.balance_mode = "two_sided"
        self.entropy_flow_estimator = "exact"

    def entropy_flow(self, *, estimator=NotProvided, balance_mode=NotProvided, static_lambda=NotProvided,
                     balance_fraction=NotProvided, max_abs_lambda=NotProvided) -> "OPEFOConfig":
        """The entropy-flow estimator ("exact", "paper", "single_logit") and the balancing rule."""
        return self._set(entropy_flow_estimator=estimator, balance_mode=balance_mode, static_lambda=static_lambda,
                         balance_fraction=balance_fraction, max_abs_lambda=max_abs_lambda)


class OPEFO(GRPO):
    """On-Policy Entropy Flow Optimization (arXiv 2605.11491)."""

    @classmethod
    @override(GRPO)
    def get_default_config(cls) -> OPEFOConfig:
        return OPEFOConfig()
