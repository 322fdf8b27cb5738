"""YAML run configs: load (safe_load), merge overlays and ``--set`` overrides, validate keys,
and build the Algorithm config.

A run config holds run keys (``algorithm``, ``iterations``, ``checkpoint_every``, ``logdir``,
``ray``) and config fields of GRPOConfig / OPEFOConfig (``env``, ``env_config``, ``lr``,
``prompts_per_batch``, ``balance_mode``, ...). An overlay may name its base with ``base:``.
A key that is neither is an error naming the key and the file.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RUN_KEYS", "load_run_config", "apply_overrides", "build_algo_config", "ConfigError", "config_fields"]

RUN_KEYS = {"algorithm": "OPEFO", "iterations": 100, "checkpoint_every": 0, "logdir": None,
            "ray": {"num_cpus": 2}, "base": None}
# AlgorithmConfig fields a run config may set besides the project's own.
RLLIB_KEYS = {"env", "env_config", "lr", "grad_clip", "seed", "num_learners"}


class ConfigError(ValueError):
    pass


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def _coerce(value: Any) -> Any:
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; a user means the number."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _coerce(v) for k, v in value.items()}
    return value


def config_fields() -> set[str]:
    from opefo_rllib.algorithms.grpo.grpo import GRPO_DEFAULTS

    return set(GRPO_DEFAULTS) | RLLIB_KEYS


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
    known = config_fields() | set(RUN_KEYS)
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def load_run_config(paths: list[str | Path] | None = None) -> dict:
    """Merge the given YAML files (later ones win) over the defaults; default: configs/tiny_cpu.yaml."""
    data: dict[str, Any] = {k: v for k, v in RUN_KEYS.items() if k != "base"}
    for p in paths or []:
        part = _read(Path(p))
        _check_keys(part, str(p))
        data.update({k: _coerce(v) for k, v in part.items()})
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``key=value`` pairs (value parsed as YAML), e.g. ``iterations=2`` or ``env_config={max_digits: 1}``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _check_keys({key: None}, f"--set {item}")
        data[key] = _coerce(yaml.safe_load(raw))
    return data


def build_algo_config(data: dict):
    """The GRPOConfig / OPEFOConfig of a merged run config (validated)."""
    from opefo_rllib.algorithms.grpo.grpo import GRPOConfig
    from opefo_rllib.algorithms.opefo.opefo import OPEFOConfig

    algo = str(data.get("algorithm", "OPEFO")).upper()
    classes = {"OPEFO": OPEFOConfig, "GRPO": GRPOConfig}
    if algo not in classes:
        raise ConfigError(f"algorithm {data.get('algorithm')!r}: choose OPEFO or GRPO")
    config = classes[algo]()
    for key, value in data.items():
        if key in RUN_KEYS:
            continue
        if key == "adam_betas" and isinstance(value, list):
            value = tuple(value)
        setattr(config, key, value)
    try:
        config.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return config
