"""GRPO: group-relative policy optimization as a native RLlib algorithm.

``GRPOConfig`` and ``GRPO`` (config + Algorithm) import Ray, so they load on first use; the math
they train with is in ``opefo_rllib.core``.
"""

__all__ = ["GRPO", "GRPOConfig"]


def __getattr__(name: str):
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("opefo_rllib.algorithms.grpo.grpo"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
