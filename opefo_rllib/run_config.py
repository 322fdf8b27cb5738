"""YAML run configs: load (safe_load), merge overlays and ``--set`` overrides, validate keys,
and build the Algorithm config.

A run config holds run keys (``algorithm``, ``iterations``, ``checkpoint_every``, ``logdir``,
``ray``) and config fields of GRPOConfig / OPEFOConfig (``env``, ``env_config``, ``lr``,
``prompts_per_batch``, ``balance_mode``, ...). An overlay may name its base with ``base:``.
A key that is neither is an error naming the key and the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from opefo_rllib.config import ConfigError, all_fields, check_value, coerce_value, rllib_fields, run_fields

__all__ = ["RUN_KEYS", "load_run_config", "apply_overrides", "build_algo_config", "ConfigError", "config_fields",
           "check_run_keys"]

# The run keys and their defaults (declared, with docs and checks, in config.sections.RunSettings).
RUN_KEYS = {name: spec.default for name, spec in run_fields().items()} | {"ray": {"num_cpus": 2}}


def config_fields() -> dict[str, Any]:
    """Every algorithm field a run config may set: the project's sections and RLlib's own."""
    return all_fields() | rllib_fields()


def _known() -> dict[str, Any]:
    return config_fields() | run_fields()


def _coerce(key: str, value: Any) -> Any:
    spec = _known().get(key)
    return coerce_value(spec, value) if spec is not None else value


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
    base = data.pop("base", None)
    if base:
        merged = _read((path.parent / base).resolve())
        merged.update(data)
        data = merged
    return data


def _check_keys(data: dict, where: str) -> None:
    known = _known()
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def load_run_config(paths: list[str | Path] | None = None) -> dict:
    """Merge the given YAML files (later ones win) over the run-key defaults."""
    data: dict[str, Any] = {k: v for k, v in RUN_KEYS.items() if k != "base"}
    for p in paths or []:
        part = _read(Path(p))
        _check_keys(part, str(p))
        data.update({k: _coerce(k, v) for k, v in part.items()})
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``key=value`` pairs (value parsed as YAML), e.g. ``iterations=2`` or ``env_config={max_digits: 1}``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _check_keys({key: None}, f"--set {item}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML: {str(e).splitlines()[0]}") from None
        data[key] = _coerce(key, value)
    return data


def check_run_keys(data: dict) -> None:
    """Check the run keys (``iterations``, ``checkpoint_every``, ...) like config fields."""
    for name, spec in run_fields().items():
        if name in data:
            check_value(spec, data[name])


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
    except ConfigError:
        raise
    except ValueError as e:  # RLlib's own checks
        raise ConfigError(str(e)) from None
    return config
