"""`opefo study`: a grid of configs x seeds that skips finished runs, resumes interrupted ones
from their latest checkpoint, reports a failing run and goes on, and tabulates mean ± std over
seeds from the run files only.

The report and the planning are tested on hand-made run directories (TensorBoard files written
with SummaryWriter, eval JSON files, fake checkpoints); two tiny real runs (4 prompts x 4
samples, 1 then 2 iterations, no eval) check the whole path once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from opefo_rllib.cli import main
from opefo_rllib.run_config import load_run_config
from opefo_rllib.config import ConfigError
from opefo_rllib.study import DONE_FILE, load_study, run_state, train_command
from opefo_rllib.study_report import DASH, seed_summary, write_report

TINY = ("set: {prompts_per_batch: 4, group_size: 4, max_new_tokens: 6, eval_before_train: false, eval_every: 0,\n"
        "      log_text_every: 0, export_hf_on_checkpoint: false}\n")


def _study(tmp_path: Path, body: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def _fake_checkpoint(run_dir: Path, iteration: int) -> Path:
    ckpt = run_dir / "checkpoints" / f"iter_{iteration:06d}"
    ckpt.mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return ckpt


# ------------------------------------------------------------------ the study file and the plan

def test_a_study_file_names_its_configs_and_values_and_bad_keys_are_refused(tmp_path):
    study = load_study(_study(tmp_path, "base: [tiny_cpu]\nruns:\n  strict: {config: [overlays/grpo_strict]}\n"
                                        "  closed: {set: {balance_mode: closed_loop, env_config: {max_digits: 1}}}\n"
                                        "seeds: [0, 1]\niterations: 3\n"))
    grid = study.grid()
    assert [(r.name, r.seed) for r in grid] == [("strict", 0), ("strict", 1), ("closed", 0), ("closed", 1)]
    cmd = train_command(grid[3], tmp_path / "out", 3)
    assert [Path(c).name for c in cmd if c.endswith(".yaml")] == ["tiny_cpu.yaml"]
    run_dir = tmp_path / "out" / "closed" / "seed_1"
    assert cmd[-6:] == ["--set", "seed=1", "--set", "iterations=3", "--logdir", str(run_dir)]
    assert "balance_mode=closed_loop" in cmd and 'env_config={"max_digits": 1}' in cmd
    by_seed = load_study(_study(tmp_path, (tmp_path / "study.yaml").read_text() + "order: seed\n", "by_seed.yaml"))
    assert [(r.name, r.seed) for r in by_seed.grid()] == [("strict", 0), ("closed", 0), ("strict", 1), ("closed", 1)]
    tail = "seeds: [0]\niterations: 2\n"
    for body, words in [("runs: {a: {}}\n" + tail + "seed: 1\n", "unknown key 'seed' (did you mean 'seeds'?)"),
                        ("runs: {a: {set: {seed: 3}}}\n" + tail, "'seed' is set by the study"),
                        ("runs: {a: {set: {grup_size: 3}}}\n" + tail, "run 'a'"),
                        ("runs: {a: {config: [overlays/nope]}}\n" + tail, "overlays/nope"),
                        ("runs: {a: {}}\nseeds: [0, 0]\niterations: 2\n", "seeds"),
                        ("runs: {a: {}}\n" + tail + "order: seeds\n", "order: 'seeds': must be one of run, seed")]:
        with pytest.raises(ConfigError) as e:
            load_study(_study(tmp_path, body, "bad.yaml"))
        assert words in str(e.value), str(e.value)


def test_the_shipped_entropy_rules_study_is_33_runs_of_500_iterations():
    study = load_study("studies/entropy_rules")
    assert list(study.runs) == ["grpo_strict", "clip_higher", "entropy_bonus", "adaptive_entropy", "forking_tokens",
                                "clip_cov", "opefo_paper", "opefo_exact", "opefo_guard", "opefo_closed_loop",
                                "opefo_optimizer_aware"]
    assert len(study.grid()) == 33 and study.iterations == 500
    # Every run is sync, as in docs/results.md (the default run streams since).
    assert study.runs["opefo_closed_loop"][1] == {"pipeline": "sync", "balance_mode": "closed_loop",
                                                  "max_abs_lambda": None}
    assert study.runs["opefo_exact"][1] == {"pipeline": "sync", "max_abs_lambda": None}  # uncapped, the old default


def test_the_shipped_smollm2_study_is_4_rules_by_3_seeds_of_100_iterations_seed_by_seed():
    study = load_study("studies/smollm2_entropy_rules")
    assert list(study.runs) == ["grpo_strict", "opefo_guard", "opefo_exact", "opefo_paper"]
    assert study.iterations == 100 and study.seeds == [0, 1, 2]
    assert [(r.name, r.seed) for r in study.grid()[:5]] == [("grpo_strict", 0), ("opefo_guard", 0), ("opefo_exact", 0),
                                                            ("opefo_paper", 0), ("grpo_strict", 1)]
    configs = {name: load_run_config(list(cfgs)) for name, (cfgs, _) in study.runs.items()}
    assert all(Path(str(c["model_path"])).name == "SmolLM2-135M-Instruct.Q4_1.gguf" for c in configs.values())
    assert configs["grpo_strict"]["balance_mode"] == "none"
    assert configs["opefo_guard"]["max_abs_lambda"] == 0.3 and "max_abs_lambda" not in study.runs["opefo_guard"][1]
    assert study.runs["opefo_exact"][1]["max_abs_lambda"] is None
    assert configs["opefo_paper"]["entropy_flow_estimator"] == "paper" and configs["opefo_paper"]["max_abs_lambda"] is None
    assert configs["opefo_guard"]["eval_every"] == 25 and configs["opefo_guard"]["eval_tasks"][0]["pass_k"] == [1, 4]


def test_the_tiny_four_rules_study_runs_the_smollm2_studys_rules_on_the_tiny_model():
    """The toy side of docs/results.md's toy-vs-real table: the same four rules, the same overlays
    and overrides, on the tiny default (sync, as the full toy study)."""
    tiny, real = load_study("studies/tiny_four_rules"), load_study("studies/smollm2_entropy_rules")
    assert list(tiny.runs) == list(real.runs) and tiny.iterations == 500 and tiny.seeds == [0]
    for name, (cfgs, overrides) in tiny.runs.items():
        real_cfgs, real_overrides = real.runs[name]
        assert [Path(c).name for c in cfgs[1:]] == [Path(c).name for c in real_cfgs[1:]]  # the rule's overlays
        assert Path(cfgs[0]).name == "tiny_cpu.yaml" and overrides.pop("pipeline") == "sync"
        assert overrides == {k: v for k, v in real_overrides.items() if k in ("max_abs_lambda",)}


def test_a_run_is_done_resumable_restarted_or_new_from_its_directory_only(tmp_path, capsys):
    run = tmp_path / "out" / "a" / "seed_0"
    assert run_state(run, 2).kind == "new"
    (run / "tensorboard").mkdir(parents=True)
    assert run_state(run, 2).kind == "restart"  # an attempt that left no checkpoint
    ckpt = _fake_checkpoint(run, 1)
    state = run_state(run, 2)
    assert (state.kind, state.checkpoint, state.iteration) == ("resumable", ckpt, 1)
    assert run_state(run, 1).kind == "done"  # the final checkpoint exists
    study = _study(tmp_path, f"base: [tiny_cpu]\n{TINY}runs: {{a: {{}}}}\nseeds: [0, 1]\niterations: 2\n")
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "0 done, 1 resumable, 0 restart, 1 new" in plan
    assert f"--resume {ckpt}" in plan and f"--logdir {tmp_path / 'out' / 'a' / 'seed_1'}" in plan
    (run / DONE_FILE).write_text(json.dumps({"iterations": 2}))
    assert run_state(run, 2).kind == "done" and run_state(run, 3).kind == "resumable"


# ------------------------------------------------------------------ the report, on hand-made runs

def _fake_run(run_dir: Path, scalars: dict[str, list[float]], evals: dict[int, dict] | None = None,
              eval_tags: dict[int, dict[str, float]] | None = None) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for step, tags in sorted((eval_tags or {}).items()):
        for tag, value in tags.items():
            writer.add_scalar(tag, value, step)
    for tag, values in scalars.items():
        for step, value in enumerate(values, start=1):
            writer.add_scalar(tag, value, step)
    writer.close()
    for iteration, results in (evals or {}).items():
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval" / f"iter_{iteration:06d}.json").write_text(json.dumps({"model": "m", "config": {},
                                                                                 "results": results}))


def _row(text: str, name: str, table: int) -> list[str]:
    section = text.split("### ")[table]
    line = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_table_is_mean_and_std_over_seeds_of_the_run_files(tmp_path):
    nan = math.nan
    out = tmp_path / "out"
    for seed, (h0, h1, lam, n_wins, greedy, slope) in enumerate([(1.0, 0.5, [0.2, nan, 0.4], 10, 0.1, 2.0),
                                                                 (1.2, 0.6, [0.5] * 3, 5, 0.2, -1.0),
                                                                 (1.4, 0.7, [0.7] * 3, 0, 0.3, None)]):
        predicted = [0.01 * i * (-1) ** i for i in range(10)]
        scalars = {"policy/entropy": [h0] + [9.0] * 8 + [h1], "rollout/reward_mean": [0.1 * seed] * 10,
                   "entropy_flow/lambda_star": lam, "entropy_flow/P": [1.0] * 10,
                   "entropy_flow/N": [2.0] * n_wins + [0.5] * (10 - n_wins),
                   "predicted_entropy_change/exact": predicted}
        if slope is not None:  # seed 2 does not log the realized change
            scalars["entropy_flow/realized_change"] = [slope * p for p in predicted]
        results = {"heldout": {"greedy_acc": greedy, "avg@8": greedy / 2, "avg@8_ci95": [0, 1],
                               "pass@1": greedy / 2, "pass@8": 2 * greedy, "maj@8": 0.0, "num_problems": 512}}
        _fake_run(out / "opefo" / f"seed_{seed}", scalars, {0: {"heldout": {"greedy_acc": 0.9}}, 10: results})
    # one seed, no flows, eval only in TensorBoard; one seed directory missing
    _fake_run(out / "grpo" / "seed_0", {"policy/entropy": [0.8, 0.4], "rollout/reward_mean": [0.0, 1.0]},
              eval_tags={0: {"eval/heldout/greedy_acc": 0.5}, 2: {"eval/heldout/greedy_acc": 0.25,
                                                                   "eval/heldout/pass@8": 0.75}})
    _fake_checkpoint(out / "grpo" / "seed_0", 2)
    runs = {"opefo": [out / "opefo" / f"seed_{s}" for s in range(3)],
            "grpo": [out / "grpo" / f"seed_{s}" for s in range(2)]}

    report = write_report(out, runs, iterations=2)
    text = report.read_text()
    assert _row(text, "opefo", 1) == ["opefo", "3", "10", "0.200 ± 0.100", "0.100 ± 0.050", "0.400 ± 0.200"]
    assert _row(text, "grpo", 1) == ["grpo", "1", "2", "0.250", DASH, "0.750"]
    opefo = _row(text, "opefo", 2)
    assert opefo[:6] == ["opefo", "3 (0)", "0.100 ± 0.100 → 0.100 ± 0.100", "1.200 ± 0.200 → 0.600 ± 0.100",
                         "0.500 ± 0.200", "50% ± 50%"]
    assert opefo[7] == "0.000 ± 1.414 (n=2)"  # corr +1 and -1; seed 2 has no realized change
    assert opefo[6].endswith("(n=2)")
    assert _row(text, "grpo", 2) == ["grpo", "1 (1)", "0.000 → 1.000", "0.800 → 0.400", DASH, DASH, DASH, DASH]
    assert seed_summary(out / "opefo" / "seed_0")["lambda_star_mean"] == pytest.approx(0.3)  # NaN left out
    assert (out / "curves.png").stat().st_size > 0
    assert write_report(out, runs, iterations=2).read_text() == text  # the same files give the same table


# ------------------------------------------------------------------ two tiny real runs

@pytest.mark.slow
def test_a_study_reports_a_failing_run_goes_on_resumes_and_never_reruns_a_finished_run(tmp_path, capsys):
    out = tmp_path / "out"
    first = _study(tmp_path, f"base: [tiny_cpu]\n{TINY}runs:\n  broken: {{set: {{model_path: {tmp_path}/no_model}}}}\n"
                             "  ok: {}\nseeds: [0]\niterations: 1\n")
    assert main(["study", str(first), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "FAILED broken seed 0: exit status 2" in captured.out and "no_model" in captured.err
    assert "done   ok seed 0" in captured.out  # after the failure, the study went on
    ok = out / "ok" / "seed_0"
    assert (ok / "checkpoints" / "iter_000001").is_dir() and (ok / DONE_FILE).is_file()

    # The same run, now 2 iterations long: interrupted after its checkpoint at 1, it resumes there.
    second = _study(tmp_path, f"base: [tiny_cpu]\n{TINY}runs:\n  ok: {{}}\nseeds: [0]\niterations: 2\n")
    assert main(["study", str(second), "--out", str(out)]) == 0
    assert "start  ok seed 0 (resume from iter_000001)" in capsys.readouterr().out
    log = (ok / "train.log").read_text()
    assert f"resumed from {ok / 'checkpoints' / 'iter_000001'} at iteration 1" in log
    assert (ok / "checkpoints" / "iter_000002").is_dir()
    from opefo_rllib.evaluation.compare import read_scalars

    assert read_scalars(ok)["rollout/reward_mean"][0] == [1, 2]  # each step once
    table = (out / "results.md").read_text()
    assert _row(table, "ok", 2)[1] == "1 (1)"

    assert main(["study", str(second), "--out", str(out)]) == 0  # finished: nothing runs
    assert "0 to run (1 done already)" in capsys.readouterr().out
    assert log == (ok / "train.log").read_text()
    assert (out / "results.md").read_text() == table


@pytest.mark.slow
def test_a_study_stopped_mid_run_resumes_where_it_stopped(tmp_path, capsys):
    """Two runs of 3 iterations, a checkpoint each iteration (only the newest kept): Ctrl-C once the
    first run has its checkpoint at iteration 1; the same command again resumes that run there,
    then starts the second, and every step is in the curves once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from opefo_rllib.evaluation.compare import read_scalars

    out = tmp_path / "out"
    study = _study(tmp_path, f"base: [tiny_cpu]\n{TINY}runs:\n  grpo_strict: {{config: [overlays/grpo_strict]}}\n"
                             "  opefo_guard: {}\nseeds: [0]\niterations: 3\norder: seed\n"
                             "set: {checkpoint_every: 1, keep_checkpoints: 1, max_failures: 0}\n")
    first = out / "grpo_strict" / "seed_0"
    # Ctrl-C as a terminal gives it: SIGINT at its default, even where pytest's process ignores it
    # (pytest-xdist's workers do, and a child inherits an ignored signal: Python would not raise).
    proc = subprocess.Popen([sys.executable, "-m", "opefo_rllib.cli", "study", str(study), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not (first / "checkpoints" / "latest").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (first / "checkpoints" / "latest").is_file(), "the first run wrote no checkpoint"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the study and its run
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "interrupted; run the same command again to resume" in stderr
    stopped_at = (first / "checkpoints" / "latest").read_text().strip()
    assert stopped_at in ("iter_000001", "iter_000002"), stopped_at  # stopped mid-run
    assert not (first / DONE_FILE).exists() and not (out / "opefo_guard").exists()

    assert main(["study", str(study), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert f"start  grpo_strict seed 0 (resume from {stopped_at})" in log
    assert "start  opefo_guard seed 0 (new)" in log
    for run in (first, out / "opefo_guard" / "seed_0"):
        assert (run / DONE_FILE).is_file()
        assert read_scalars(run)["rollout/reward_mean"][0] == [1, 2, 3]  # each step once
        assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == ["iter_000003"]  # keep_checkpoints: 1
    assert f"resumed from {first / 'checkpoints' / stopped_at}" in (first / "train.log").read_text()
    table = (out / "results.md").read_text()
    assert _row(table, "grpo_strict", 2)[1] == _row(table, "opefo_guard", 2)[1] == "1 (1)"


def test_an_attempt_without_a_checkpoint_is_kept_aside_and_the_run_starts_again(tmp_path, capsys):
    out = tmp_path / "out"
    attempt = out / "broken" / "seed_0"
    (attempt / "tensorboard").mkdir(parents=True)
    (attempt / "train.log").write_text("an earlier attempt\n")
    study = _study(tmp_path, f"base: [tiny_cpu]\n{TINY}runs:\n  broken: {{set: {{model_path: {tmp_path}/no_model}}}}\n"
                             "seeds: [0]\niterations: 1\n")
    assert main(["study", str(study), "--out", str(out)]) == 1  # fails at once: no model (no training)
    assert "start  broken seed 0 (restart)" in capsys.readouterr().out
    kept = list((out / ".attempts").iterdir())
    assert len(kept) == 1 and (kept[0] / "train.log").read_text() == "an earlier attempt\n"
    assert "an earlier attempt" not in (attempt / "train.log").read_text()
    assert "| broken | 1 (0) | — | — |" in (out / "results.md").read_text()


def test_the_real_lm_study_tables_come_from_the_run_files(tmp_path, capsys):
    """benchmarks/real_lm_study.py on two hand-made seeds: the N > P share, λ* percentiles, the
    per-batch and per-token correlations, and held-out values averaged over seeds with intervals."""
    import importlib.util
    import sys

    from paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location("real_lm_study", REPO_ROOT / "benchmarks" / "real_lm_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "study"
    predicted = [0.01, -0.02, 0.03, -0.04]
    for seed, (n_values, token_corr) in enumerate([([2.0, 2.0, 0.0, 2.0], 0.2), ([0.5, 0.5, 0.0, 2.0], 0.4)]):
        run = out / "opefo" / f"seed_{seed}"
        _fake_run(run, {"entropy_flow/P": [1.0, 1.0, 0.0, 1.0], "entropy_flow/N": n_values,  # step 3: no signal
                        "entropy_flow/lambda_star": [0.1, 0.2, math.nan, 0.5],
                        "predicted_entropy_change/exact": predicted,
                        "entropy_flow/realized_change": [3 * p for p in predicted],  # corr +1
                        "entropy_flow/token_corr/exact": [token_corr] * 4,
                        "policy/entropy": [1.0] * 4, "rollout/reward_mean": [0.5] * 4,
                        "rollout/response_length_mean": [10.0] * 4})
        rows = [{"id": "p1", "rewards": [1.0, 0.0], "greedy_reward": 1.0},
                {"id": "p2", "rewards": [0.0, 0.0], "greedy_reward": float(seed)}]
        (run / "eval").mkdir()
        (run / "eval" / "iter_000004.problems.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # A seed just started: its iteration-0 eval only. It is no seed of the training tables yet.
    _fake_run(out / "opefo" / "seed_2", {}, eval_tags={0: {"eval/t/greedy_acc": 0.0}})
    # The reference rule, seed 0 only: the differences pair opefo's seed 0 with it.
    ref = out / "grpo_strict" / "seed_0"
    _fake_run(ref, {"entropy_flow/P": [1.0] * 4, "entropy_flow/N": [2.0] * 4, "rollout/reward_mean": [0.5] * 4})
    (ref / "eval").mkdir()
    (ref / "eval" / "iter_000004.problems.jsonl").write_text(
        json.dumps({"id": "p1", "rewards": [1.0, 1.0], "greedy_reward": 1.0}) + "\n"
        + json.dumps({"id": "p2", "rewards": [1.0, 0.0], "greedy_reward": 1.0}) + "\n")
    sys.argv = ["real_lm_study.py", str(out), "--window", "2", "--finished"]
    with pytest.raises(SystemExit, match="no run has trained yet"):
        module.main()  # no seed marked done
    sys.argv = ["real_lm_study.py", str(out), "--window", "2", "--seeds", "1"]
    module.main()
    assert next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| opefo | 1 | 4 |"))
    sys.argv = ["real_lm_study.py", str(out), "--window", "2"]
    module.main()
    text = capsys.readouterr().out
    diag = next(line for line in text.splitlines() if line.startswith("| opefo | 2 |"))
    assert "| 25% ± 0% | 0% ± 0% | 67% ± 47% |" in diag  # no signal, one-sided, N > P (3 of 3, 1 of 3)
    assert "0.200 ± 0.000 / " in diag  # λ* median of [0.1, 0.2, 0.5]
    assert "| 0.267 ± 0.000 |" in diag  # λ* mean of the same
    pred = next(line for line in text.split("### Prediction")[1].splitlines() if line.startswith("| opefo |"))
    cells = [c.strip() for c in pred.strip("|").split("|")]
    assert cells[4] == "1.00 ± 0.00" and cells[7] == "0.30 ± 0.14"  # per-batch exact, per-token exact
    held = next(line for line in text.split("### Held-out")[1].splitlines() if line.startswith("| opefo | 4 |"))
    # greedy: p1 1.0, p2 (0 + 1) / 2; avg@2: p1 0.5, p2 0; pass@2: p1 1, p2 0
    assert held.startswith("| opefo | 4 | 2 | 0.750 [") and "| 0.250 [" in held and "| 0.500 [0.00, 1.00] |" in held
    # Against the reference, seed 0 with seed 0: greedy (1 - 1, 0 - 1), avg@2 (0.5 - 1, 0 - 0.5),
    # pass@2 (1 - 1, 0 - 1) per problem; then avg@2 of each seed, opefo's and the reference's.
    vs = next(line for line in text.split("### Held-out against grpo_strict")[1].splitlines()
              if line.startswith("| opefo |"))
    assert vs.startswith("| opefo | 4 | 1 | -0.500 [") and vs.count("| -0.500 [") == 3, vs
    assert vs.endswith("| 0.250; 0.750 |"), vs
    # Seed by seed (opefo only: grpo_strict has one seed): N > P, λ* median, |λ*| > 0.3, realized
    # change (3 × the mean of ``predicted``), per-token corr, entropy and reward over the last 2,
    # held-out at iteration 4 (greedy, avg@2, pass@2).
    seeds = text.split("### Seed by seed")[1]
    assert "| grpo_strict |" not in seeds
    assert "| opefo | 0 | 100% | 0.200 | 33% | -0.015 | 0.20 | 1.000 | 0.500 | 4 | 0.500 | 0.250 | 0.500 |" in seeds
    assert "| opefo | 1 | 33% | 0.200 | 33% | -0.015 | 0.40 | 1.000 | 0.500 | 4 | 1.000 | 0.250 | 0.500 |" in seeds


def test_entropy_goal_reads_a_study_as_it_stands(tmp_path, capsys):
    """benchmarks/entropy_goal.py on a study stopped early: the goals against strict GRPO, each run
    the mean of the seeds that have trained; a seed with only its iteration-0 eval is left out."""
    import importlib.util
    import sys

    from paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location("entropy_goal", REPO_ROOT / "benchmarks" / "entropy_goal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "study"
    held_out = {2: {"t": {"greedy_acc": 0.9, "avg@4": 0.8, "pass@4": 1.0}}}
    _fake_run(out / "grpo_strict" / "seed_0", {"policy/entropy": [1.0, 0.5], "rollout/reward_mean": [0.5, 0.9],
                                               "entropy_flow/realized_change": [-0.1, -0.1]}, evals=held_out)
    _fake_run(out / "grpo_strict" / "seed_1", {}, evals={0: {"t": {"greedy_acc": 0.1, "avg@4": 0.1, "pass@4": 0.1}}},
              eval_tags={0: {"eval/t/greedy_acc": 0.1}})
    _fake_run(out / "opefo" / "seed_0", {"policy/entropy": [1.0, 0.95], "rollout/reward_mean": [0.5, 0.9],
                                         "entropy_flow/realized_change": [0.004, -0.002]}, evals=held_out)
    # A seed stopped at iteration 1 (no held-out eval yet): counted as it stands, left out by --finished.
    _fake_run(out / "opefo" / "seed_1", {"policy/entropy": [1.0], "rollout/reward_mean": [0.5],
                                         "entropy_flow/realized_change": [0.5]})
    sys.argv = ["entropy_goal.py", str(out)]
    module.main()
    as_it_stands = _row("### " + capsys.readouterr().out, "opefo", 1)
    assert as_it_stands[1:3] == ["2", "2@2/1@nan"]
    for seed in (out / "grpo_strict" / "seed_0", out / "opefo" / "seed_0"):
        (seed / DONE_FILE).write_text("{}")
    sys.argv = ["entropy_goal.py", str(out), "--seeds", "1"]  # GRPO's seed 1 has not trained yet
    with pytest.raises(SystemExit, match="the reference run grpo_strict has no trained seed among the seeds asked for"):
        module.main()
    sys.argv = ["entropy_goal.py", str(out), "--finished"]
    module.main()
    text = capsys.readouterr().out
    assert text.startswith("reference grpo_strict: greedy 0.900, avg 0.800, pass 1.000, mean |realized change| 1.00e-01")
    grpo = _row("### " + text, "grpo_strict", 1)
    assert grpo[1:4] == ["1", "2@2", "1.000 → 0.500 (-50%) **no**"] and grpo[-1] == "3/5"
    opefo = _row("### " + text, "opefo", 1)
    # entropy -5%, held-out equal to GRPO's, |mean realized change| 1e-3 = 1% of GRPO's mean |change|
    assert opefo[1:4] == ["1", "2@2", "1.000 → 0.950 (-5%) yes"] and opefo[-2].startswith("+1.00e-03 (1%") and opefo[-1] == "5/5"
