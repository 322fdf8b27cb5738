"""A quiet start: the notices our dependencies print on every run, off unless ``--verbose``.

A plain ``opefo train`` used to open with Ray's token-authentication notice, RLlib's
``RLModule(config=...)`` DeprecationWarning (RLlib builds our module that way itself),
transformers' "Loading weights" / "Writing model shards" bars, DeepSpeed's "Setting accelerator
to CPU" warning and its "... built successfully" line, Ray Tune's "Install gputil ..." and
vLLM's Triton CPU-backend line: none of them is something the user can act on, and they hide the
lines that matter. Each is silenced at its source, by a logger level or an environment variable
read at import, and only where we know the message: other warnings still show.

Environment variables are set in this process before the libraries are imported, and travel to
the Ray actors in ``runtime_env`` (``ray_env_vars``); ``OPEFO_VERBOSE`` tells actor code
(e.g. the learner's DeepSpeed set-up) which way the user chose.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Iterator

__all__ = ["quiet_env", "silence_known_notices", "ray_env_vars", "is_verbose", "quiet_stdout"]

VERBOSE_ENV = "OPEFO_VERBOSE"

# Read at import by transformers / huggingface_hub: no progress bars, errors only.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}

# Loggers whose WARNING-level notice on every start we know and silence (ERROR still shows).
NOISY_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",  # "Token authentication is enabled ..."
    "ray._common.deprecation",  # RLlib's RLModule(config=...) DeprecationWarning (RLlib's own call)
    "ray.tune.utils.util",  # "Install gputil for GPU system monitoring."
    "vllm.triton_utils.importing",  # "Triton is installed, but doesn't include CPU backend"
)


def is_verbose() -> bool:
    """Whether the user asked for every library notice (``--verbose``, in this process or an actor)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_env(verbose: bool) -> dict[str, str]:
    """The environment variables of a quiet (or, ``verbose``, a plain) run, for this process and
    the actors. DS_ACCELERATOR=cpu only where no GPU is visible: it is what DeepSpeed would detect,
    without the warning that it detected it."""
    env = {VERBOSE_ENV: "1" if verbose else "0"}
    if not verbose:
        env.update(QUIET_ENV)
        if "DS_ACCELERATOR" not in os.environ and not _cuda_visible():
            env["DS_ACCELERATOR"] = "cpu"
    return env


def _cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def silence_known_notices(verbose: bool) -> None:
    """Set this process's environment (keeping what the user set) and lower the known noisy
    loggers to ERROR; also turn off transformers' progress bars if it is imported already."""
    for key, value in quiet_env(verbose).items():
        if key == VERBOSE_ENV:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    if verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import transformers.utils.logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def ray_env_vars(ray_kwargs: dict, verbose: bool) -> dict:
    """``ray.init`` keyword arguments with the quiet environment added to ``runtime_env``'s
    env_vars (the user's own values win), so actors on any node start quiet too."""
    runtime_env = dict(ray_kwargs.get("runtime_env") or {})
    env_vars = {k: v for k, v in quiet_env(verbose).items() if k != "DS_ACCELERATOR"}
    env_vars.update(runtime_env.get("env_vars") or {})
    runtime_env["env_vars"] = env_vars
    return {**ray_kwargs, "runtime_env": runtime_env}


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Swallow what a library ``print``s (DeepSpeed's "... built successfully") unless verbose."""
    if is_verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
