"""Our side of SGLang's API, checked against the installed package's source (SGLang's runtime
needs CUDA and is not run here). CI installs `sglang` without its dependencies for this."""

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest

from opefo_rllib.fleet import sglang_engine
from opefo_rllib.fleet.sglang_engine import SGLANG_CALLS


def _sglang_engine_methods() -> dict[str, set[str]]:
    spec = importlib.util.find_spec("sglang")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, "sglang is not installed (CI installs it --no-deps)"
    source = Path(spec.submodule_search_locations[0]) / "srt" / "entrypoints" / "engine.py"
    tree = ast.parse(source.read_text())
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    methods = {}
    for f in engine.body:
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = f.args
            params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} - {"self"}
            if a.kwarg:
                params.add("**")
            methods[f.name] = params
    return methods


def test_every_sglang_call_we_make_exists_with_these_parameters():
    methods = _sglang_engine_methods()
    for name, kwargs in SGLANG_CALLS.items():
        assert name in methods, f"sglang.Engine has no method {name!r} any more"
        missing = [k for k in kwargs if k not in methods[name] and "**" not in methods[name]]
        assert not missing, f"sglang.Engine.{name} no longer takes {missing}; it takes {sorted(methods[name])}"


def test_the_engine_module_makes_no_sglang_call_outside_the_checked_table():
    tree = ast.parse(inspect.getsource(sglang_engine))
    calls = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "engine"):
            calls.setdefault(node.func.attr, set()).update(k.arg for k in node.keywords)
    assert calls, "found no self.engine.<method>(...) calls"
    for method, kwargs in calls.items():
        assert method in SGLANG_CALLS, f"self.engine.{method} is called but not checked against sglang"
        assert kwargs <= set(SGLANG_CALLS[method]), (method, kwargs - set(SGLANG_CALLS[method]))
    assert set(calls) == set(SGLANG_CALLS)


def test_sglang_engine_constructor_arguments_exist_in_server_args():
    # sglang.Engine(**kwargs) builds ServerArgs, whose fields live in server_args.py and arg_groups/.
    root = Path(importlib.util.find_spec("sglang").submodule_search_locations[0]) / "srt"
    fields = set()
    for source in [root / "server_args.py", *sorted((root / "arg_groups").rglob("*.py"))]:
        for cls in (n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ClassDef)):
            fields |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for field in ("model_path", "skip_tokenizer_init", "dtype", "random_seed", "enable_lora", "max_lora_rank",
                  "lora_target_modules"):
        assert field in fields, f"sglang ServerArgs has no field {field!r}"


def test_sglang_engine_refuses_truncated_sampling_before_touching_sglang():
    from opefo_rllib.fleet.engine import SamplingConfig

    engine = object.__new__(sglang_engine.SGLangEngine)  # no runtime: only our guard is exercised
    with pytest.raises(ValueError, match="full distribution"):
        engine.generate([[1, 2]], 2, SamplingConfig(top_p=0.5))


def test_sglang_weights_go_through_load_weights_only():
    # The distributed-update methods had no caller and were removed: no native transfer, and no
    # sglang call for it left in the checked table.
    engine_cls = sglang_engine.SGLangEngine
    assert engine_cls.weight_transfer_backend is None
    assert not hasattr(engine_cls, "init_weight_group") and not hasattr(engine_cls, "load_weights_distributed")
    assert not {"init_weights_update_group", "update_weights_from_distributed"} & set(SGLANG_CALLS)


def test_sglang_sampling_params_are_fields_of_sglangs_sampling_params():
    # generate(sampling_params=dict) builds sglang's SamplingParams(**dict): every key must be one of its fields.
    from opefo_rllib.fleet.engine import SamplingConfig

    root = Path(importlib.util.find_spec("sglang").submodule_search_locations[0]) / "srt"
    tree = ast.parse((root / "sampling" / "sampling_params.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SamplingParams")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    params = sglang_engine.sglang_sampling_params(SamplingConfig(stop_token_ids=[7]), (2, 0, 7))
    assert set(params) <= fields, f"not fields of sglang's SamplingParams: {set(params) - fields}"
    assert params["stop_token_ids"] == [2, 0, 7] and params["top_k"] == -1 and params["top_p"] == 1.0


def test_sglang_engine_stops_at_every_eos_id_and_stop_token_id():
    from opefo_rllib.fleet.engine import SamplingConfig

    class FakeSGLang:  # answers like sglang.Engine.generate: (logprob, token id, text) per output token
        def generate(self, input_ids, sampling_params, return_logprob, lora_path):
            self.params, self.lora_path = sampling_params, lora_path
            return [{"meta_info": {"output_token_logprobs": [(-0.1, 5, None), (-0.2, 0, None)]}} for _ in input_ids]

    engine = object.__new__(sglang_engine.SGLangEngine)
    engine.engine, engine.eos_ids, engine._version = FakeSGLang(), (2, 0), 3
    results = engine.generate([[1, 2]], 2, SamplingConfig(stop_token_ids=(9,)))
    assert engine.engine.params["stop_token_ids"] == [2, 0, 9]  # both EOS ids, then the run's stop ids
    assert all(r.finished and r.response_ids == [5, 0] and r.weight_version == 3 for r in results[0])
    assert engine.engine.lora_path is None  # no adapter: the base model
    engine.adapter = "opefo-v3"
    engine.generate([[1, 2]], 2, SamplingConfig())
    assert engine.engine.lora_path == ["opefo-v3", "opefo-v3"]  # every row names the version's adapter


def test_the_sglang_probe_reads_the_input_token_logprobs_after_the_first():
    class FakeSGLang:  # answers like sglang.Engine.generate with logprob_start_len=0: one per input token
        def generate(self, input_ids, sampling_params, return_logprob, logprob_start_len, lora_path):
            self.args = (sampling_params, logprob_start_len, lora_path)
            ids = input_ids[0]
            return [{"meta_info": {"input_token_logprobs": [(None, ids[0], None)]
                                   + [(-0.5 * t, t, None) for t in ids[1:]]}}]

    engine = object.__new__(sglang_engine.SGLangEngine)
    engine.engine, engine.adapter = FakeSGLang(), "opefo-v2"
    assert engine.probe_logprobs([4, 6, 8]) == [-3.0, -4.0]  # the first token has no log-prob
    params, start, lora = engine.engine.args
    assert start == 0 and params["temperature"] == 1.0 and lora == ["opefo-v2"]  # the served adapter too


def test_the_adapter_config_sglang_reads_has_its_keys_and_our_targets():
    from opefo_rllib.models.lora import adapter_config, target_modules_of

    config = adapter_config(16, 32.0, target_modules_of("qwen2", None))  # what SGLangEngine(lora=...) passes
    root = Path(importlib.util.find_spec("sglang").submodule_search_locations[0]) / "srt" / "lora" / "lora_config.py"
    source = root.read_text()
    for key in ("target_modules", "r", "lora_alpha"):  # what sglang's LoRAConfig reads from config_dict
        assert f'hf_config["{key}"]' in source, key
        assert key in config
    assert config["r"] == 16 and "q_proj" in config["target_modules"] and "down_proj" in config["target_modules"]


def test_sglang_adapter_sync_loads_the_new_version_then_unloads_the_old():
    """Our side only (no runtime): the calls and their order, against a recording stand-in."""
    calls = []

    class Recorder:
        def __getattr__(self, name):
            return lambda **kw: calls.append((name, kw))

    engine = object.__new__(sglang_engine.SGLangEngine)
    engine.engine, engine.adapter, engine.lora_config = Recorder(), None, {"r": 4}
    adapter = {"model.layers.0.self_attn.q_proj.lora_A.default.weight": 1}
    engine.load_weights(adapter, 1)
    engine.load_weights(adapter, 2)
    assert [(n, kw.get("lora_name")) for n, kw in calls] == [
        ("load_lora_adapter_from_tensors", "opefo-v1"), ("load_lora_adapter_from_tensors", "opefo-v2"),
        ("unload_lora_adapter", "opefo-v1")]
    assert list(calls[0][1]["tensors"]) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert engine.adapter == "opefo-v2" and engine.weight_version() == 2
