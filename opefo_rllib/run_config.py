"""YAML run configs: find (a path or a shipped name), load (safe_load), merge overlays and
overrides, validate keys, and build the Algorithm config.

A run config holds run keys (``algorithm``, ``iterations``, ``checkpoint_every``, ``logdir``,
``ray``) and config fields of GRPOConfig / OPEFOConfig (``env``, ``env_config``, ``lr``,
``prompts_per_batch``, ``balance_mode``, ...). An overlay may name its base with ``base:``.
A key that is neither is a ConfigError naming the key and where it was given.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import yaml

from opefo_rllib.config import ConfigError, all_fields, check_value, coerce_value, rllib_fields, run_fields

__all__ = ["RUN_KEYS", "RunConfigSource", "ConfigNotFound", "shipped_configs", "default_config", "resolve_config",
           "load_run_config", "run_config_of", "parse_overrides", "set_values", "apply_overrides",
           "build_algo_config", "ConfigError", "config_fields", "check_run_keys"]

# The run keys and their defaults (declared, with docs and checks, in config.sections.RunSettings).
RUN_KEYS = {name: spec.default for name, spec in run_fields().items()}

# A run config as train() takes it: a path or shipped name, a mapping of keys, or a list of
# them overlaid in order (later ones win).
RunConfigSource = Union[str, os.PathLike, Mapping[str, Any], Iterable[Union[str, os.PathLike, Mapping[str, Any]]]]


class ConfigNotFound(ConfigError):
    """A config named by a path that does not exist and by no shipped config; ``name`` is what
    was asked for, ``shipped`` the names that exist."""

    def __init__(self, name: str, shipped: list[str]):
        self.name, self.shipped = name, shipped
        super().__init__(f"config {name}: no such file, and no shipped config of that name "
                         f"(shipped: {', '.join(shipped)})")


def shipped_configs() -> Path:
    """The folder of the shipped run configs (package data of ``opefo_rllib.configs``)."""
    return Path(str(importlib.resources.files("opefo_rllib.configs")))


def default_config() -> Path:
    """The run config used when none is given: the tiny CPU default."""
    return shipped_configs() / "tiny_cpu.yaml"


def resolve_config(name: str | os.PathLike) -> Path:
    """A path, or the name of a shipped config (``tiny_cpu``, ``overlays/grpo_strict``, with or
    without ``.yaml``); ConfigNotFound otherwise."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    name = str(name)
    shipped = shipped_configs() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    raise ConfigNotFound(name, sorted(str(p.relative_to(shipped_configs()).with_suffix(""))
                                      for p in shipped_configs().rglob("*.yaml")))


def config_fields() -> dict[str, Any]:
    """Every algorithm field a run config may set: the project's sections and RLlib's own."""
    return all_fields() | rllib_fields()


def _known() -> dict[str, Any]:
    return config_fields() | run_fields()


def _coerce(key: str, value: Any) -> Any:
    spec = _known().get(key)
    return coerce_value(spec, value) if spec is not None else value


def _with_base(data: dict, folder: Path) -> dict:
    """``data`` over the config its ``base:`` names (a path relative to ``folder``)."""
    base = data.pop("base", None)
    if not base:
        return data
    merged = _read((folder / base).resolve())
    merged.update(data)
    return merged


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a mapping of keys, got {type(data).__name__}")
    return _with_base(data, path.parent)


def _check_keys(data: Mapping, where: str) -> None:
    known = _known()
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _defaults() -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in RUN_KEYS.items() if k != "base"}


def load_run_config(paths: list[str | Path] | None = None) -> dict:
    """Merge the given YAML files (later ones win) over the run-key defaults."""
    return run_config_of(list(paths or []))


def run_config_of(source: RunConfigSource | None) -> dict:
    """The merged run config of ``source`` over the run-key defaults: a path or shipped name, a
    mapping of keys (its ``base:`` relative to the current directory), or a list of them (later
    ones win); None: the default config."""
    if source is None:
        source = [default_config()]
    elif isinstance(source, (str, os.PathLike, Mapping)):
        source = [source]
    data = _defaults()
    for part in source:
        if isinstance(part, Mapping):
            where, values = "run config", _with_base(dict(part), Path.cwd())
        else:
            where = str(part)
            values = _read(resolve_config(part))
        _check_keys(values, where)
        data.update({k: _coerce(k, v) for k, v in values.items()})
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``--set`` text, ``key=value`` each (the value parsed as YAML, e.g. ``iterations=2`` or
    ``env_config={max_digits: 1}``), as a mapping; errors name the item."""
    values = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _check_keys({key: None}, f"--set {item}")
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML: {str(e).splitlines()[0]}") from None
    return values


def set_values(data: dict, values: Mapping[str, Any] | None, where: str = "overrides") -> dict:
    """Set ``values`` (config keys -> values) in ``data``; an unknown key is a ConfigError."""
    _check_keys(values or {}, where)
    data.update({k: _coerce(k, v) for k, v in (values or {}).items()})
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``--set`` text items (``key=value``, see parse_overrides) in ``data``."""
    return set_values(data, parse_overrides(overrides))


def check_run_keys(data: dict) -> None:
    """Check the run keys (``iterations``, ``checkpoint_every``, ...) like config fields."""
    for name, spec in run_fields().items():
        if name in data:
            check_value(spec, data[name])


def check_fields(data: dict) -> None:
    """Check every value of a merged run config against its field's type and checks (no RLlib:
    the rules that span fields are checked when the Algorithm config is built)."""
    known = _known()
    for key, value in data.items():
        if key in known:
            check_value(known[key], value)


def build_algo_config(data: dict):
    """The GRPOConfig / OPEFOConfig of a merged run config (validated; ConfigError names the field)."""
    from opefo_rllib.algorithms.grpo.grpo import GRPOConfig
    from opefo_rllib.algorithms.opefo.opefo import OPEFOConfig

    check_run_keys(data)
    config = {"OPEFO": OPEFOConfig, "GRPO": GRPOConfig}[str(data.get("algorithm", "OPEFO")).upper()]()
    for key, value in data.items():
        if key not in RUN_KEYS:
            setattr(config, key, value)
    try:
        config.validate()
    except ValueError as e:  # RLlib's own checks; ours raise ConfigError (a ValueError) already
        raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from None
    return config
