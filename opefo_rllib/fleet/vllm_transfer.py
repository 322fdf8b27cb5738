"""Trainer -> vLLM engines through vLLM's native weight-transfer API (the ``"native"`` strategy
of :class:`opefo_rllib.fleet.weight_sync.WeightSync`; needs vLLM installed).

The learner (which holds the weights, on its GPU in production) runs vLLM's trainer-side engine
for the backend, ``nccl`` (engines on their own GPUs), ``ipc`` (engines colocated on the learner's
GPU) or ``opefo_gloo`` (CPU, see :mod:`gloo_transfer`); the engines receive through
``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
``finish_weight_update``. :class:`NativeWeightSender` is that trainer side, kept in the learner.

:class:`FleetSyncClient` is vLLM's ``VLLMWeightSyncClient`` protocol over our engine actors. It
differs from vLLM's ``RayVLLMWeightSyncClient`` in two ways that a fleet of independent engines
needs: each engine gets its own ``rank_offset`` in the transfer group (vLLM's trainer engines give
every worker offset 1, which is right for one engine and collides for two), and every call has a
timeout that names the engines and the step.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import ray
from vllm.distributed.weight_transfer import WeightSource, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.base import ParamMeta

from opefo_rllib.fleet.fleet import wait_all
from opefo_rllib.fleet.ports import reserved_port

__all__ = ["FleetSyncClient", "StateDictSource", "NativeWeightSender", "trainer_init_info", "NATIVE_BACKENDS"]

NATIVE_BACKENDS = ("nccl", "ipc", "opefo_gloo")


class FleetSyncClient:
    """vLLM's four-call weight-sync protocol (plus shutdown) fanned out to engine actors.

    Args:
        actors: engine actor handles (``EngineActor``), in fleet order.
        world_sizes: workers per engine (tensor x pipeline parallel), for the rank offsets.
        timeout_s: per call; a call past it raises ``TimeoutError`` naming the engines and step.
        step: training iteration, for error messages.
    """

    def __init__(self, actors: Sequence[Any], world_sizes: Sequence[int], timeout_s: float, step: int = 0):
        if len(actors) != len(world_sizes):
            raise ValueError(f"{len(actors)} engine actors but {len(world_sizes)} world sizes")
        self.actors, self.world_sizes = list(actors), [int(w) for w in world_sizes]
        self.timeout_s, self.step = timeout_s, step
        self.version: int | None = None  # the version finish_weight_update stamps on the engines

    def _all(self, what: str, calls: list) -> list:
        wait_all(calls, self.timeout_s, f"weight transfer: {what} at step {self.step}")
        out = []
        for engine, call in enumerate(calls):
            try:
                out.append(ray.get(call))
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"weight transfer: {what} failed on engine {engine} at step {self.step}: {e}") from e
        return out

    def rank_offsets(self, base: int) -> list[int]:
        """First rank of each engine's workers: engines follow each other after ``base``."""
        offsets, nxt = [], base
        for w in self.world_sizes:
            offsets.append(nxt)
            nxt += w
        return offsets

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        if "rank_offset" in init_info:  # rendezvous backends: a distinct block of ranks per engine
            infos = [{**init_info, "rank_offset": off} for off in self.rank_offsets(int(init_info["rank_offset"]))]
        else:  # IPC: no ranks
            infos = [dict(init_info) for _ in self.actors]
        self._all("init_weight_transfer_engine",
                  [a.init_weight_transfer.remote(info) for a, info in zip(self.actors, infos)])

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine", [a.shutdown_weight_transfer.remote() for a in self.actors])

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [a.start_weight_update.remote() for a in self.actors])

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._all("update_weights", [a.update_weights.remote(update_info) for a in self.actors])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        if version is None:
            raise RuntimeError("FleetSyncClient.finish_weight_update: no weight version set for this round")
        self._all("finish_weight_update", [a.finish_weight_update.remote(version) for a in self.actors])


class StateDictSource(WeightSource):
    """vLLM's ``WeightSource`` over a callable that yields ``(name, tensor)`` in checkpoint (HF)
    names; re-run every round, so it always sends the learner's current weights."""

    def __init__(self, named_tensors: Callable[[], Iterable[tuple[str, Any]]]):
        self.named_tensors = named_tensors

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.named_tensors()]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for name, t in self.named_tensors():
            yield name, t.detach()


def trainer_init_info(backend: str, world_size: int, master_address: str, timeout_s: float, port: int = 0):
    """vLLM's trainer-side init info for a backend (the trainer is rank 0 and the only sender).
    ``nccl`` needs ``port``, held with :func:`~opefo_rllib.fleet.ports.reserved_port` until vLLM's
    store listens on it; ``opefo_gloo``'s store picks its own (0) and tells the engines."""
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        if not port:
            raise ValueError("the nccl backend needs a port (hold one with fleet.ports.reserved_port)")
        return NCCLTrainerInitInfo(master_address=master_address, master_port=port, world_size=world_size, rank=0)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=0)
    if backend == "opefo_gloo":
        from opefo_rllib.fleet.gloo_transfer import GlooTrainerInitInfo, register_gloo_backend

        register_gloo_backend()
        return GlooTrainerInitInfo(world_size=world_size, master_address=master_address, master_port=port,
                                   timeout_s=timeout_s, rank=0)
    raise ValueError(f"weight_transfer_backend {backend!r} is not one of {NATIVE_BACKENDS}")


class NativeWeightSender:
    """The trainer side, kept in the learner between rounds.

    ``send`` (re)builds the transfer group when the fleet's membership changed (first round, or an
    engine was restarted), then pushes the weights and stamps ``version`` on every engine.
    """

    def __init__(self, named_tensors: Callable[[], Iterable[tuple[str, Any]]], master_address: str = "127.0.0.1"):
        self.named_tensors, self.master_address = named_tensors, master_address
        self.engine = None
        self.client: FleetSyncClient | None = None

    def send(self, actors: Sequence[Any], world_sizes: Sequence[int], backend: str, version: int, step: int,
             timeout_s: float, rebuild: bool) -> float:
        start = time.perf_counter()
        if rebuild or self.engine is None:
            self.close()
            client = FleetSyncClient(actors, world_sizes, timeout_s, step)
            client.shutdown_weight_transfer_engine()  # survivors of a restart drop the old group
            # nccl: vLLM binds the port itself (SO_REUSEADDR); we hold it until its store listens
            held = reserved_port(self.master_address) if backend == "nccl" else contextlib.nullcontext(0)
            with held as port:
                info = trainer_init_info(backend, 1 + sum(world_sizes), self.master_address, timeout_s, port)
                self.engine = WeightTransferTrainerFactory.trainer_init(info, client=client,
                                                                        source=StateDictSource(self.named_tensors))
            self.client = client
        self.client.step, self.client.version = step, int(version)
        self.engine.send_weights()
        return time.perf_counter() - start

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self.engine, self.client = None, None
