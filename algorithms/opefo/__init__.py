"""OPEFO: On-Policy Entropy Flow Optimization (arXiv 2605.11491) as a native RLlib algorithm.

``OPEFOConfig`` and ``OPEFO`` (config + Algorithm) import Ray, so they load on first use; the math
they train with is in ``opefo_rllib.core``.
"""

__all__ = ["OPEFO", "OPEFOConfig"]


def __getattr__(name: str):
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("opefo_rllib.algorithms.opefo.opefo"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
