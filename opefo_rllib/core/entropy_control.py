"""Adaptive entropy bonus (Skywork-OR1; TRL's use_adaptive_entropy): a controller on entropy_coef.

    coef_{k+1} = clip( coef_k + entropy_coef_lr x (H_target - H_k), 0, entropy_coef_max )

H_k is the batch's mean response-token entropy as sampled; H_target is entropy_target, or the
first batch's entropy. Step k's loss uses coef_{k+1} (``coefficient(H_k)``, no state change);
the learner commits it after the step (``after_update(H_k)``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AdaptiveEntropyCoef"]


class AdaptiveEntropyCoef:
    """The adapted entropy coefficient and its target (both checkpointed)."""

    def __init__(self, coef: float, lr: float, coef_max: float, target: float | None = None):
        self.coef, self.lr, self.coef_max, self.target = float(coef), float(lr), float(coef_max), target

    @classmethod
    def of(cls, config: Any) -> "AdaptiveEntropyCoef":
        target = float(config.entropy_target) if config.entropy_target is not None else None
        return cls(config.entropy_coef, config.entropy_coef_lr, config.entropy_coef_max, target)

    def _target(self, batch_entropy: float) -> float:
        return self.target if self.target is not None else batch_entropy

    def coefficient(self, batch_entropy: float) -> float:
        """The coefficient for the loss of the batch whose entropy is ``batch_entropy``."""
        coef = self.coef + self.lr * (self._target(batch_entropy) - batch_entropy)
        return min(max(coef, 0.0), self.coef_max)

    def after_update(self, batch_entropy: float) -> None:
        """Commit the step's coefficient (and the target, from the first batch)."""
        self.coef, self.target = self.coefficient(batch_entropy), self._target(batch_entropy)

    def get_state(self) -> dict[str, Any]:
        return {"coef": self.coef, "target": self.target}

    def set_state(self, state: dict[str, Any]) -> None:
        self.coef, self.target = float(state["coef"]), state["target"]
