"""Register verifiable-reward envs with Gymnasium and with Ray Tune (so RLlib resolves them).

    register_env("my/Reverse-v0", ReverseEnv, max_len=8)
    env = gymnasium.make("my/Reverse-v0")         # or RLlib: config.environment("my/Reverse-v0")

``make_env`` also takes Gymnasium's ``module:env-id`` form (``myenvs:my/Reverse-v0`` imports
``myenvs``, which registers the env) and ``import_env_modules`` imports a run's ``imports:``.
A module that is not on ``sys.path`` is looked for in the current directory, as ``python -m``
would find it, so ``opefo train`` (a console script) imports ``./myenvs.py`` too; ``sys.path``
itself is left as it is (Ray's workers get the driver's current directory on theirs).
Registration with Tune happens once Ray's Tune registry is loaded (``import opefo_rllib`` hooks
its import and calls ``register_all_with_tune``), so importing the envs alone never imports Ray.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any, Callable, Iterable

import gymnasium as gym

__all__ = ["register_env", "list_envs", "make_env", "import_env_modules", "register_all_with_tune", "EnvNotFound"]

_REGISTERED: dict[str, dict[str, Any]] = {}


class EnvNotFound(KeyError):
    """No env of that name, or its module cannot be imported; the message says how to fix it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _tune_register(name: str) -> bool:
    if "ray.tune.registry" not in sys.modules:  # registered by register_all_with_tune when Ray loads
        return False
    from ray.tune.registry import register_env as tune_register_env

    tune_register_env(name, lambda env_config: make_env(name, **dict(env_config or {})))
    return True


def register_all_with_tune() -> None:
    """Register every env registered so far with Ray Tune (called when the algorithms load)."""
    import ray.tune.registry  # noqa: F401

    for name in _REGISTERED:
        _tune_register(name)


def _import_from_cwd(module: str):
    """Import ``module`` (dotted: its top-level package) from the current directory, which need
    not be on ``sys.path``; re-raise the caller's ModuleNotFoundError when it is not there."""
    top = module.partition(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {top!r}", name=top)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[top] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[top]
        raise
    return importlib.import_module(module)


def import_env_modules(modules: Iterable[str] | None, where: str = "imports") -> None:
    """Import the modules that register a run's envs (``imports:`` of a run config): from
    ``sys.path``, else from the current directory."""
    for module in modules or ():
        try:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module.partition(".")[0]:
                    raise  # the module is there; something it imports is missing
                _import_from_cwd(module)
        except ImportError as e:
            raise EnvNotFound(f"{where}: cannot import module {module!r} ({e}); it must be importable from the "
                              "current directory or PYTHONPATH") from None


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
    """``gymnasium.make(name, **kwargs)``, unwrapped (text envs need no Gymnasium wrappers);
    ``module:env-id`` imports ``module`` first (it registers ``env-id``)."""
    if ":" in name:
        module, _, env_id = name.partition(":")
        import_env_modules([module], where=f"env {name!r}")
        name = env_id
    if name not in gym.registry:
        raise EnvNotFound(f"no environment registered as {name!r}; registered: {list_envs()}. An env of your own "
                          "module: name it 'module:env-id' (e.g. myenvs:my/Reverse-v0) or list the module under "
                          "'imports:' in the run config")
    return gym.make(name, **kwargs).unwrapped


def list_envs() -> list[str]:
    """Names registered through ``register_env`` (the built-ins included)."""
    return sorted(_REGISTERED)
