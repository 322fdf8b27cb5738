"""Layering: the math imports only torch; importing it (or the config) loads no
Ray; `import opefo_rllib` still makes "GRPO" and "OPEFO" known to Ray Tune."""

import ast
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
MATH = [ROOT / "algorithms" / "grpo" / name for name in ("advantages.py", "losses.py", "__init__.py")] + \
       [ROOT / "algorithms" / "opefo" / name for name in ("token_stats.py", "entropy_flow.py", "loss.py", "__init__.py")]
STDLIB = set(sys.stdlib_module_names)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_math_modules_import_only_torch_the_stdlib_and_other_math():
    for path in MATH:
        for name in _imports(path):
            top = name.split(".")[0]
            ok = top in STDLIB or top == "torch" or name.startswith(("opefo_rllib.algorithms.grpo.advantages",
                                                                     "opefo_rllib.algorithms.grpo.losses",
                                                                     "opefo_rllib.algorithms.opefo.token_stats",
                                                                     "opefo_rllib.algorithms.opefo.entropy_flow",
                                                                     "opefo_rllib.algorithms.opefo.loss"))
            assert ok, f"{path.relative_to(ROOT)} imports {name}"


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_importing_the_math_and_the_config_loads_no_ray():
    out = _python("""
        import sys, time
        t = time.perf_counter()
        import opefo_rllib.algorithms.opefo, opefo_rllib.algorithms.grpo
        math_s = time.perf_counter() - t
        import opefo_rllib.config, opefo_rllib.rollout.batch
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "deepspeed", "vllm", "transformers"})
        print(heavy, f"{math_s:.2f}")
    """)
    heavy, seconds = out.strip().rsplit(" ", 1)
    assert heavy == "[]", heavy
    print(f"import opefo_rllib.algorithms.opefo + .grpo: {seconds} s")


def test_import_opefo_rllib_registers_the_algorithms_with_tune():
    out = _python("""
        import sys
        import opefo_rllib
        assert "ray" not in sys.modules
        from ray.tune.registry import get_trainable_cls
        from opefo_rllib.algorithms.grpo.grpo import GRPO
        from opefo_rllib.algorithms.opefo.opefo import OPEFO
        assert get_trainable_cls("OPEFO") is OPEFO and get_trainable_cls("GRPO") is GRPO
        print("ok")
    """)
    assert out.strip() == "ok"


def test_registration_works_when_rllib_was_imported_first():
    out = _python("""
        from ray.tune.registry import get_trainable_cls
        import ray.rllib.algorithms.registry
        import opefo_rllib
        print(get_trainable_cls("OPEFO").__name__)
    """)
    assert out.strip() == "OPEFO"
