"""opefo-rllib: RLVR with On-Policy Entropy Flow Optimization, as a Ray RLlib plugin.

``import opefo_rllib`` registers the algorithms "GRPO" and "OPEFO" with Ray Tune
(``tune.Tuner("OPEFO", param_space=config)``); the math and the envs stay importable without
Ray (``opefo_rllib.algorithms.opefo``, ``opefo_rllib.envs``).
"""

import os

__version__ = "0.1.0"


def register_algorithms() -> bool:
    """Register GRPO and OPEFO with Ray Tune; False if Ray is not installed."""
    try:
        from ray.tune.registry import register_trainable
    except ImportError:
        return False
    from opefo_rllib.algorithms.grpo.grpo import GRPO
    from opefo_rllib.algorithms.opefo.opefo import OPEFO

    register_trainable("GRPO", GRPO)
    register_trainable("OPEFO", OPEFO)
    return True


if not os.environ.get("OPEFO_POOL_WORKER"):  # verifier worker processes need no Ray
    register_algorithms()
