"""The GRPO family (imports only torch): group advantages, registered policy losses, aggregation.
``GRPO`` and ``GRPOConfig`` (the RLlib algorithm, which imports Ray) load on first use."""

from opefo_rllib.algorithms.grpo.advantages import (
    ADV_ESTIMATORS,
    get_adv_est,
    group_advantages,
    register_adv_est,
)
from opefo_rllib.algorithms.grpo.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    POLICY_LOSS_SETTINGS,
    PolicyLossConfig,
    aggregate_loss,
    entropy_bonus,
    get_policy_loss,
    loss_settings,
    policy_loss,
    register_policy_loss,
    token_covariance,
)

__all__ = [
    "GRPO",
    "GRPOConfig",
    "ADV_ESTIMATORS",
    "AGG_MODES",
    "POLICY_LOSSES",
    "POLICY_LOSS_SETTINGS",
    "PolicyLossConfig",
    "loss_settings",
    "aggregate_loss",
    "entropy_bonus",
    "get_adv_est",
    "get_policy_loss",
    "group_advantages",
    "policy_loss",
    "register_adv_est",
    "register_policy_loss",
    "token_covariance",
]


def __getattr__(name: str):
    # The RLlib classes import Ray; the math above does not, so they load on first use.
    if name in ('GRPO', 'GRPOConfig'):
        import importlib

        return getattr(importlib.import_module("opefo_rllib.algorithms.grpo.grpo"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
