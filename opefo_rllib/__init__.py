"""opefo-rllib: RLVR with On-Policy Entropy Flow Optimization, as a Ray RLlib plugin.

``import opefo_rllib`` makes "GRPO" and "OPEFO" known to Ray Tune
(``tune.Tuner("OPEFO", param_space=config)``) without importing Ray itself: the math
(``opefo_rllib.core``), the config sections and the envs load in well under a second and never
import Ray. The algorithms join RLlib's own algorithm table
(``ray.rllib.algorithms.registry.ALGORITHMS``), which Tune consults for a name it does not know;
they are imported only when Tune asks for them. The envs join Tune's env registry when Ray's
Tune registry is first imported (or at once, if it already is).

``opefo_rllib.train`` is ``opefo_rllib.training.train`` (the loop of ``opefo train``), loaded
when first used.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

_RLLIB_REGISTRY = "ray.rllib.algorithms.registry"


def __getattr__(name: str):
    if name in ("train", "TrainResult"):  # on first use: the training loop's modules stay unloaded until then
        from opefo_rllib import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load(name: str):
    from opefo_rllib.algorithms.grpo.grpo import GRPO
    from opefo_rllib.algorithms.opefo.opefo import OPEFO

    cls = {"GRPO": GRPO, "OPEFO": OPEFO}[name]
    return cls, cls.get_default_config()


def _add_to(registry) -> None:
    for name in ("GRPO", "OPEFO"):
        registry.ALGORITHMS.setdefault(name, lambda n=name: _load(n))


def _register_envs_with_tune(_module) -> None:
    registry = sys.modules.get("opefo_rllib.envs.registry")
    if registry is not None:  # envs registered before Tune loaded; later ones register themselves
        registry.register_all_with_tune()


_HOOKS = {_RLLIB_REGISTRY: _add_to, "ray.tune.registry": _register_envs_with_tune}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a hook on a Ray module right after it is first imported: RLlib's algorithm table
    gets GRPO and OPEFO, Tune's registry gets the envs registered so far."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HookedLoader(spec.loader, _HOOKS[fullname])
        return spec


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, inner, hook):
        self.inner, self.hook = inner, hook

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.hook(module)


if _RLLIB_REGISTRY in sys.modules:
    _add_to(sys.modules[_RLLIB_REGISTRY])
if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport())
