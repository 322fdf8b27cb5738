"""A second node, simulated: a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

Node 1 (the head) runs the driver and the learner; node 2, labelled ``opefo-role: engines``, runs
the two vLLM engines (``engine_node_labels``), which get the weights over the native transfer
(``opefo_gloo``, its store on ``weight_transfer_address``). ``opefo train`` connects through
``ray: {address: ...}``, as on a real cluster. Mid-run node 2 dies (its raylet and every process
of it SIGKILLed, as when a machine goes): the engines come back on node 1
(``engine_node_fallback``) with the learner's weights, the transfer group is rebuilt around them,
and the run finishes every iteration with whole, on-policy batches.

Not simulated: a second machine (both nodes share this host's address and disk), GPUs and NCCL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

LABEL = {"opefo-role": "engines"}
ITERATIONS = 6
KILL_AFTER = 2  # node 2 dies once this iteration's line is printed
# Ray marks a lost node dead after its health check misses this many periods (defaults 3 s x 5);
# shortened so the test spends seconds, not half a minute, waiting for it.
HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}


def _engines_under(raylet_pid: int) -> list[int]:
    """The engine actors' processes of one node (its raylet's children)."""
    import psutil

    try:
        procs = psutil.Process(raylet_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            if p.name().startswith("ray::EngineActor"):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_node(cluster, node) -> None:
    """SIGKILL a node's raylet and every process under it (its workers outlive a killed raylet
    otherwise, which a lost machine's do not)."""
    import psutil

    raylet = node.all_processes["raylet"][0].process.pid
    procs = psutil.Process(raylet).children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _scalars(run_dir, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list(run_dir.glob("**/events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def _two_nodes():
    """Node 1 (the head, 2 CPUs) and node 2 (1 CPU, labelled for the engines)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "_system_config": HEALTH_CHECK})
    return cluster, cluster.add_node(num_cpus=1, labels=LABEL)


def test_engines_on_a_second_node_survive_its_loss(tmp_path):
    """Through the CLI: engines on node 2 with native (gloo) weight transfer; node 2 dies after
    iteration 2; the engines come back on node 1 and the run finishes, nothing lost."""
    import ray

    cluster, node2 = _two_nodes()
    try:
        head_raylet = cluster.head_node.all_processes["raylet"][0].process.pid
        node2_raylet = node2.all_processes["raylet"][0].process.pid
        address = cluster.address
        node_ip = address.split(":")[0]
        args = [f"iterations={ITERATIONS}", "prompts_per_batch=4", "group_size=4", "max_new_tokens=6",
                "eval_before_train=false", "eval_every=0", "log_text_every=0", "checkpoint_every=0",
                "engine=vllm", "num_engines=2", "weight_sync=native",
                f"ray={{address: '{address}'}}", f"weight_transfer_address={node_ip}",
                "engine_node_labels={opefo-role: engines}", "engine_node_fallback=true"]
        # --debug: a failure shows its traceback in the assertion message (the run itself is the same)
        cmd = [sys.executable, "-m", "opefo_rllib.cli", "train", "--debug", "--logdir", str(tmp_path / "run")]
        for a in args:
            cmd += ["--set", a]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
        lines, placed, killed_at, recovered_at = [], {}, None, None
        for line in proc.stdout:
            lines.append(line.rstrip())
            m = re.match(r"\s+iter\s+(\d+)/", line)
            if not m:
                continue
            it = int(m[1])
            if it == 1:  # the engines run on node 2 only
                placed["before"] = (len(_engines_under(node2_raylet)), len(_engines_under(head_raylet)))
            if it == KILL_AFTER:
                _kill_node(cluster, node2)
                killed_at = time.monotonic()
            elif killed_at and recovered_at is None:
                recovered_at = time.monotonic()
                placed["after"] = len(_engines_under(head_raylet))
        rc = proc.wait(timeout=60)
        out = "\n".join(lines)
        assert rc == 0, out
        assert placed["before"] == (2, 0), out
        assert placed["after"] == 2, out  # both engines came back on node 1
        iters = [int(m[1]) for m in re.finditer(r"^\s+iter\s+(\d+)/", out, re.M)]
        assert iters == list(range(1, ITERATIONS + 1)), out
        step_s = [float(s) for s in re.findall(r"([\d.]+)s/it", out)]
        print(f"\ntwo nodes: s/it {step_s}; iteration {KILL_AFTER + 1} (node lost, engines restarted) "
              f"took {recovered_at - killed_at:.1f} s after the kill")
        run_dir = tmp_path / "run"
        assert _scalars(run_dir, "rollout/num_samples") == [16.0] * ITERATIONS  # no sample lost
        assert max(_scalars(run_dir, "rollout/logprob_gap_max")) < 1e-4  # every sample of the learner's weights
        assert _scalars(run_dir, "fleet/engine_restarts")[-1] == 2
        builds = _scalars(run_dir, "fleet/transfer_group_builds")
        assert builds[0] == 1 and builds[-1] == 2  # the gloo group rebuilt once, around the replacements
        assert _scalars(run_dir, "fleet/native_weight_sync") == [1.0] * ITERATIONS
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_engines_that_only_a_lost_node_could_run_end_the_run_in_one_line():
    """engine_node_labels without the fallback: when node 2 dies and no other node has the
    labels, the restart waits restart_timeout_s, then one line says what the engine needs."""
    import ray

    from opefo_rllib.cli import failure_line
    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.fleet.fleet import EngineFleet, EngineUnplaceable
    from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
    from opefo_rllib.models.tokenizer import CharTokenizer

    cluster, node2 = _two_nodes()
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        tok = CharTokenizer.load(TINY_DEFAULT_PATH)
        fleet = EngineFleet("hf", num_engines=2, engine_kwargs={"model_path": str(TINY_DEFAULT_PATH),
                                                               "eos_token_id": tok.eos_token_id},
                            node_labels=LABEL, restart_timeout_s=5, sync_timeout_s=30)
        assert len(_engines_under(node2.all_processes["raylet"][0].process.pid)) == 2
        _kill_node(cluster, node2)
        pending = fleet.submit([tok.encode(f"{i}+1=") for i in range(4)], 2, SamplingConfig(max_new_tokens=4), seed=1)
        start = time.monotonic()
        with pytest.raises(EngineUnplaceable) as raised:
            while pending:
                *_, pending, _ = fleet.wait_any(pending, step=7)
        assert time.monotonic() - start < 30
        line = failure_line(raised.value)  # what opefo train prints, exit status 1
        assert line == str(raised.value) and "\n" not in line
        assert re.fullmatch(r"engine \d died at step 7 and its replacement was not placed and started within 5 s "
                            r"\(resource_wait_timeout_s \+ weight_sync_timeout_s\): it needs a node labelled "
                            r"\{'opefo-role': 'engines'\} \(engine_node_labels\) with 0.5 CPU free; add such a node, "
                            r"or raise resource_wait_timeout_s, or set engine_node_fallback", line), line
        fleet.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


def _measure_recovery(fast_health_check: bool) -> None:
    """Seconds from node 2's loss to a whole batch again, two HF engines (the CLI test's engines
    are vLLM's; this isolates detection + restart), with Ray's default or the shortened check."""
    import ray
    from ray.cluster_utils import Cluster

    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.fleet.fleet import EngineFleet
    from opefo_rllib.models.tiny import TINY_DEFAULT_PATH
    from opefo_rllib.models.tokenizer import CharTokenizer

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, **({"_system_config": HEALTH_CHECK} if fast_health_check else {})})
    node2 = cluster.add_node(num_cpus=1, labels=LABEL)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        tok = CharTokenizer.load(TINY_DEFAULT_PATH)
        start = time.monotonic()
        fleet = EngineFleet("hf", num_engines=2, engine_kwargs={"model_path": str(TINY_DEFAULT_PATH),
                                                               "eos_token_id": tok.eos_token_id},
                            node_labels=LABEL, node_fallback=True)
        up = time.monotonic() - start

        def batch() -> float:
            start = time.monotonic()
            pending = fleet.submit([tok.encode(f"{i}+1=") for i in range(4)], 2, SamplingConfig(max_new_tokens=4), 1)
            while pending:
                *_, pending, _ = fleet.wait_any(pending, step=1)
            return time.monotonic() - start

        clean = batch()
        _kill_node(cluster, node2)
        lost = batch()
        head = len(_engines_under(cluster.head_node.all_processes["raylet"][0].process.pid))
        print(f"health check {'shortened' if fast_health_check else 'default'}: engines up {up:.1f} s, batch "
              f"{clean:.2f} s, batch after the loss {lost:.1f} s ({fleet.restarts} restarts, {head} engines on node 1)")
        fleet.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":  # python tests/integration/test_two_nodes.py: the recovery figures of docs/scaling.md
    _measure_recovery(fast_health_check=False)
    _measure_recovery(fast_health_check=True)
