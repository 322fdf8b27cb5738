"""Balance rules: which lambda an update applies, as a registry like the policy losses'.

Every rule weights the tokens w_t = 1 + lambda c_t (docs/algorithm.md sections 5-8), with
c_t = +1 on S+ (delta > 0) and -1 on S- (delta < 0) for each side the rule reweights, 0 elsewhere.
A rule is a small object built from ``BalanceSettings``; it chooses lambda from the batch's flow
totals (``choose_lambda``), and a rule driven by what the step did (closed loop) updates its state
in ``after_update``, which the learner calls after the optimizer step. ``get_state`` /
``set_state`` carry that state through checkpoints.

Add a rule by subclassing ``BalanceRule`` and registering it; it is then a ``balance_mode``:

    @register_balance_rule("my_rule")
    class MyRule(BalanceRule):
        def raw_lambda(self, totals): ...  # -> lambda before the |lambda| cap

Built in: "none" (w = 1: GRPO), "two_sided" (OPEFO: lambda = f lambda*), "increase_only" /
"decrease_only" (the one-sided ablations), "static" (lambda = static_lambda), "closed_loop"
(lambda = f_k lambda*, f_k from the realized entropy changes) and "optimizer_aware" (the lambda
whose AdamW step leaves the mean entropy unchanged in parameter space, param_balance.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import torch

from opefo_rllib.core.param_balance import optimizer_aware_lambda

__all__ = ["BALANCE_RULES", "BalanceSettings", "BalanceRule", "OptimizerAwareInputs", "register_balance_rule",
           "get_balance_rule", "make_balance_rule", "lambda_star", "is_one_sided"]

BALANCE_RULES: dict[str, type["BalanceRule"]] = {}


@dataclasses.dataclass(frozen=True)
class BalanceSettings:
    """The config fields the rules read (config/sections.py EntropyFlowSettings declares them)."""

    static_lambda: float = 0.0
    balance_fraction: float = 1.0
    max_abs_lambda: float | None = None
    entropy_target: float | None = None
    closed_loop_gain: float = 10.0
    closed_loop_target_gain: float = 1.0
    closed_loop_max_fraction: float = 1.5

    @classmethod
    def of(cls, values: Any) -> "BalanceSettings":
        """The settings read from any object with these fields (a config)."""
        return cls(**{f.name: getattr(values, f.name, f.default) for f in dataclasses.fields(cls)})


class OptimizerAwareInputs(NamedTuple):
    """What optimizer_aware needs of the learner: the gradients of the mean entropy, of the unweighted
    loss and of the sign(delta)-weighted loss (summed over learners), and AdamW's step for a gradient."""

    grad_entropy: Sequence[torch.Tensor]
    g_total: Sequence[torch.Tensor]
    g_diff: Sequence[torch.Tensor]
    step_fn: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def is_one_sided(totals) -> bool:
    """True when the batch's flow is all on one side (exactly one of P, N is 0)."""
    p, n = float(totals.P), float(totals.N)
    return (p == 0.0) != (n == 0.0)


def lambda_star(totals) -> float:
    """lambda* = (N - P) / (N + P): 0 when N + P = 0, NaN for a one-sided batch."""
    p, n = float(totals.P), float(totals.N)
    if is_one_sided(totals):
        return math.nan
    return (n - p) / (n + p) if n + p > 0 else 0.0


class BalanceRule:
    """A balancing rule: w_t = 1 + lambda c_t on the sides it reweights. The base is the two-sided
    rule lambda = f lambda* (0 for a one-sided batch: nothing on the other side to trade against)."""

    name = "two_sided"
    increase = True  # reweights S+ (delta > 0)
    decrease = True  # reweights S- (delta < 0)
    needs_gradients = False  # optimizer_aware: choose_lambda wants OptimizerAwareInputs

    def __init__(self, settings: BalanceSettings | None = None):
        self.settings = settings or BalanceSettings()

    def fraction(self) -> float:
        """f in lambda = f lambda* (logged as entropy_flow/balance_fraction)."""
        return self.settings.balance_fraction

    def cap(self) -> float | None:
        return self.settings.max_abs_lambda

    def raw_lambda(self, totals) -> float:
        """lambda before the |lambda| cap."""
        star = lambda_star(totals)
        return 0.0 if math.isnan(star) else self.fraction() * star

    def choose_lambda(self, totals, inputs: OptimizerAwareInputs | None = None) -> tuple[float, dict[str, float]]:
        """The lambda of this batch, capped at |lambda| <= cap, and the rule's own metrics."""
        return self.capped(self.raw_lambda(totals)), {}

    def capped(self, lam: float) -> float:
        cap = self.cap()
        if cap is not None:
            lam = max(-cap, min(cap, lam))
        if not (-1.0 < lam < 1.0) or math.isnan(lam):
            raise ValueError(f"lambda must lie in (-1, 1) so every weight stays positive, got {lam}")
        return lam

    def sides(self, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """c_t [B, T] float32: +1 on S+, -1 on S- for the sides this rule reweights, 0 elsewhere."""
        d, m = delta.detach(), mask.to(torch.bool)
        sides = torch.zeros_like(d, dtype=torch.float32)
        if self.increase:
            sides = torch.where(m & (d > 0), torch.ones_like(sides), sides)
        if self.decrease:
            sides = torch.where(m & (d < 0), -torch.ones_like(sides), sides)
        return sides

    def side_weights(self, lam: float) -> tuple[float, float]:
        """(w on S+, w on S-), each rounded once."""
        return (1.0 + lam if self.increase else 1.0), (1.0 - lam if self.decrease else 1.0)

    def after_update(self, entropy_after: float, change: float) -> dict[str, float]:
        """Called by the learner after the step with the batch's re-scored entropy and its realized
        change; a controller updates its state here. Returns metrics to log."""
        return {}

    def get_state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        pass


def register_balance_rule(name: str) -> Callable[[type[BalanceRule]], type[BalanceRule]]:
    """Class decorator: make ``cls`` the balance_mode ``name``."""

    def wrap(cls: type[BalanceRule]) -> type[BalanceRule]:
        cls.name = name
        BALANCE_RULES[name] = cls
        return cls

    return wrap


def get_balance_rule(name: str) -> type[BalanceRule]:
    try:
        return BALANCE_RULES[name]
    except KeyError:
        raise ValueError(f"unknown balance mode {name!r}; choose one of {tuple(BALANCE_RULES)}") from None


def make_balance_rule(name: str, values: Any = None) -> BalanceRule:
    """The rule ``name`` with its settings read from ``values`` (a config; None: the defaults)."""
    return get_balance_rule(name)(BalanceSettings.of(values) if values is not None else None)


register_balance_rule("two_sided")(BalanceRule)


@register_balance_rule("none")
class NoBalance(BalanceRule):
    """GRPO: w = 1."""

    increase = decrease = False

    def choose_lambda(self, totals, inputs=None):
        return 0.0, {}


@register_balance_rule("increase_only")
class IncreaseOnly(BalanceRule):
    """Ablation: 1 + lambda* on S+ only."""

    decrease = False


@register_balance_rule("decrease_only")
class DecreaseOnly(BalanceRule):
    """Ablation: 1 - lambda* on S- only."""

    increase = False


@register_balance_rule("static")
class StaticLambda(BalanceRule):
    """A fixed lambda (static_lambda) on both sides."""

    def raw_lambda(self, totals) -> float:
        return float(self.settings.static_lambda)


_CLOSED_LOOP_MAX_LAMBDA = 0.95  # f > 1 may push |f lambda*| towards 1, where one side's weight vanishes


@register_balance_rule("closed_loop")
class ClosedLoop(BalanceRule):
    """lambda = f_k lambda*, |lambda| <= 0.95; after each step (docs/algorithm.md section 7)
    f -= gain x realized change + target_gain x relative gap to the entropy target, in [0, f_max].
    Entropy rising (change > 0, or above the target) lowers f, so less of the net decreasing flow
    is cancelled next step. The target is entropy_target, or the first batch's entropy."""

    def __init__(self, settings: BalanceSettings | None = None):
        super().__init__(settings)
        self.closed_loop_fraction = 1.0
        self.entropy_target = self.settings.entropy_target

    def fraction(self) -> float:
        return self.closed_loop_fraction

    def cap(self) -> float | None:
        cap = self.settings.max_abs_lambda
        return min(cap, _CLOSED_LOOP_MAX_LAMBDA) if cap is not None else _CLOSED_LOOP_MAX_LAMBDA

    def after_update(self, entropy_after: float, change: float) -> dict[str, float]:
        s = self.settings
        if self.entropy_target is None:
            self.entropy_target = entropy_after - change
        gap = (entropy_after - self.entropy_target) / self.entropy_target
        f = self.closed_loop_fraction - s.closed_loop_gain * change - s.closed_loop_target_gain * gap
        self.closed_loop_fraction = min(max(f, 0.0), float(s.closed_loop_max_fraction))
        return {"entropy_flow/entropy_target": self.entropy_target}

    def get_state(self) -> dict[str, Any]:
        return {"fraction": self.closed_loop_fraction, "entropy_target": self.entropy_target}

    def set_state(self, state: dict[str, Any]) -> None:
        self.closed_loop_fraction = float(state["fraction"])
        self.entropy_target = state["entropy_target"]


@register_balance_rule("optimizer_aware")
class OptimizerAware(BalanceRule):
    """Two-sided weights with the lambda whose AdamW step leaves the batch's mean entropy unchanged
    to first order in parameter space (param_balance.py), from the learner's ``inputs``; without
    them (plain ``balance_weights``) it falls back to lambda*. A one-sided batch gets lambda = 0."""

    needs_gradients = True

    def choose_lambda(self, totals, inputs: OptimizerAwareInputs | None = None):
        if inputs is None or math.isnan(lambda_star(totals)):
            return super().choose_lambda(totals)
        cap = self.cap()
        lam, info = optimizer_aware_lambda(inputs.grad_entropy, inputs.g_total, inputs.g_diff, inputs.step_fn,
                                           cap=cap if cap is not None else 0.95)
        return self.capped(lam), {"entropy_flow/lambda_optimizer_aware": lam,
                                  "entropy_flow/predicted_param_change": info["predicted_change"],
                                  "entropy_flow/predicted_param_change_grpo": info["predicted_change_grpo"]}
