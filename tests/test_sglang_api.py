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
    for field in ("model_path", "skip_tokenizer_init", "dtype", "random_seed"):
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
