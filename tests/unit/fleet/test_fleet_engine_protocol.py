"""Every engine implements the Engine protocol the fleet calls, and EngineActor calls it directly.

Checked by signature (``inspect``), so vLLM's and SGLang's engines are checked without starting
them (SGLang's module imports ``sglang`` only inside the constructor).
"""

import ast
import inspect
import typing

import pytest

from opefo_rllib.fleet.engine import Engine, NoNativeTransfer
from opefo_rllib.fleet.fleet import EngineActor
from opefo_rllib.fleet.hf_engine import HFEngine
from opefo_rllib.fleet.sglang_engine import SGLangEngine


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(Engine).items()
            if inspect.isfunction(fn) and not name.startswith("_")}


def _engine_classes():
    classes = [HFEngine, SGLangEngine]
    try:
        from opefo_rllib.fleet.vllm_engine import VLLMEngine
    except ImportError:  # vLLM is an optional extra
        pass
    else:
        classes.append(VLLMEngine)
    return classes


def test_the_protocol_lists_every_call_the_fleet_makes():
    assert set(_protocol_methods()) == {
        "generate", "generated_tokens", "load_weights", "weight_version", "probe_logprobs", "release_memory",
        "resume_memory",
        "shutdown", "world_size",
        "init_weight_transfer", "shutdown_weight_transfer", "start_weight_update", "update_weights",
        "finish_weight_update", "abort_weight_update"}
    assert "weight_transfer_backend" in typing.get_type_hints(Engine)


@pytest.mark.parametrize("cls", _engine_classes(), ids=lambda c: c.__name__)
def test_each_engine_implements_the_protocol_by_signature(cls):
    for name, expected in _protocol_methods().items():
        method = getattr(cls, name, None)
        assert callable(method), f"{cls.__name__}.{name} is missing"
        got = inspect.signature(method)
        assert list(got.parameters) == list(expected.parameters), (
            f"{cls.__name__}.{name}{got} does not match Engine.{name}{expected}")
    assert hasattr(cls, "weight_transfer_backend"), f"{cls.__name__} does not say whether it has native transfer"


def test_engines_without_native_transfer_say_so_and_refuse_it():
    for cls in (HFEngine, SGLangEngine):
        assert issubclass(cls, NoNativeTransfer) and cls.weight_transfer_backend is None
    engine = object.__new__(SGLangEngine)  # no runtime needed: the refusal is ours
    assert engine.world_size() == 1 and engine.abort_weight_update() is True
    with pytest.raises(NotImplementedError, match="SGLangEngine has no native weight transfer"):
        engine.start_weight_update()


def test_the_engine_actor_forwards_the_whole_protocol_without_probing():
    actor_cls = EngineActor.__ray_actor_class__
    for name, expected in _protocol_methods().items():
        assert callable(getattr(actor_cls, name, None)), f"EngineActor.{name} is missing"
        got = [p for p in inspect.signature(getattr(actor_cls, name)).parameters if not p.startswith("_ray")]
        assert got == list(expected.parameters), f"EngineActor.{name}({got}) vs Engine.{name}{expected}"
    tree = ast.parse(inspect.getsource(actor_cls))
    probes = [n.func.id for n in ast.walk(tree)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("getattr", "hasattr")]
    assert not probes, f"EngineActor probes its engine with {probes}"


def test_a_real_hf_engine_is_an_engine():
    """Versioned weights in, versioned samples out; memory released and resumed, the same samples."""
    from opefo_rllib.fleet.engine import SamplingConfig
    from opefo_rllib.models.tiny import TINY_DEFAULT_PATH

    engine = HFEngine(str(TINY_DEFAULT_PATH), eos_token_id=2)
    assert isinstance(engine, Engine) and engine.weight_transfer_backend is None
    engine.load_weights(engine.model.state_dict(), 5)
    sampling = SamplingConfig(max_new_tokens=4)
    first = engine.generate([[5, 6, 7]], 3, sampling, seed=1)
    assert engine.weight_version() == 5 and {r.weight_version for r in first[0]} == {5}
    assert all(1 <= len(r.response_ids) <= 4 and len(r.sampling_logp) == len(r.response_ids) for r in first[0])
    engine.release_memory()
    engine.resume_memory()
    again = engine.generate([[5, 6, 7]], 3, sampling, seed=1)
    assert [r.response_ids for r in again[0]] == [r.response_ids for r in first[0]]
    engine.shutdown()


def test_sampling_defaults_to_the_configs_answer_length():
    from opefo_rllib.config.sections import GenerationSettings
    from opefo_rllib.fleet.engine import SamplingConfig

    assert SamplingConfig().max_new_tokens == GenerationSettings().max_new_tokens == 8
