"""Register verifiable-reward envs with Gymnasium and with Ray Tune (so RLlib resolves them).

    register_env("my/Reverse-v0", ReverseEnv, max_len=8)
    env = gymnasium.make("my/Reverse-v0")         # or RLlib: config.environment("my/Reverse-v0")
"""

from __future__ import annotations

import os
from typing import Any, Callable

import gymnasium as gym

__all__ = ["register_env", "list_envs", "make_env"]

_REGISTERED: dict[str, dict[str, Any]] = {}


def _tune_register(name: str) -> bool:
    if os.environ.get("OPEFO_POOL_WORKER"):  # verifier workers need no Ray (saves ~3 s per start)
        return False
    try:
        from ray.tune.registry import register_env as tune_register_env
    except ImportError:  # Ray is optional for the envs layer
        return False
    tune_register_env(name, lambda env_config: make_env(name, **dict(env_config or {})))
    return True


def register_env(name: str, entry_point: str | Callable[..., gym.Env], **defaults: Any) -> None:
    """Register ``entry_point`` (a class, a factory, or "module:Class") under ``name``.

    ``defaults`` are keyword arguments of the env; ``gymnasium.make(name, **overrides)`` and an
    RLlib ``env_config`` override them. Registering a name again replaces it.
    """
    if name in gym.registry:
        del gym.registry[name]
    gym.register(id=name, entry_point=entry_point, kwargs=dict(defaults), disable_env_checker=True)
    _REGISTERED[name] = dict(defaults)
    _tune_register(name)


def make_env(name: str, **kwargs: Any) -> gym.Env:
    """``gymnasium.make(name, **kwargs)``, unwrapped (text envs need no Gymnasium wrappers)."""
    if name not in gym.registry:
        raise KeyError(f"no environment registered as {name!r}; registered: {list_envs()}")
    return gym.make(name, **kwargs).unwrapped


def list_envs() -> list[str]:
    """Names registered through ``register_env`` (the built-ins included)."""
    return sorted(_REGISTERED)
