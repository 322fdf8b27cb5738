"""Which model directory ``opefo eval MODEL`` means."""

from __future__ import annotations

from pathlib import Path

from opefo_rllib.checkpoints import RUN_FILE, latest_checkpoint
from opefo_rllib.config.fields import ConfigError
from opefo_rllib.models.gguf import gguf_model_dir, is_gguf
from opefo_rllib.models.tiny import TINY_DEFAULT, TINY_DEFAULT_PATH

__all__ = ["resolve_eval_model"]


def resolve_eval_model(model: str) -> Path:
    """``tiny-default``; a ``.gguf`` file (a path or ``pkg:PACKAGE/FILE``: its converted directory);
    a Hugging Face model directory (it has config.json); a checkpoint directory (its ``hf_policy/``);
    or a run directory (its latest checkpoint's ``hf_policy/``)."""
    if model == TINY_DEFAULT:
        return TINY_DEFAULT_PATH
    if is_gguf(model):
        try:
            return gguf_model_dir(model)
        except (FileNotFoundError, ImportError) as e:
            raise ConfigError(f"model {model}: {e}") from None
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model {model}: no such directory (give tiny-default, a Hugging Face model directory, "
                          "or a checkpoint directory)")
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        path = latest
    if (path / "hf_policy" / "config.json").is_file():
        return path / "hf_policy"
    if (path / RUN_FILE).is_file() or (path / "rllib_checkpoint.json").is_file():
        raise ConfigError(f"checkpoint {path} has no hf_policy/ (it was saved with export_hf_on_checkpoint off); "
                          "evaluate a checkpoint that has one")
    raise ConfigError(f"model {model}: not a model directory (no config.json) and not a checkpoint (no hf_policy/)")
