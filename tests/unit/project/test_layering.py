"""Layering: every module's layer is its package, and imports go one way, downwards.

Each ``.py`` file's module name comes from pyproject.toml's package-dir mapping (``envs/`` is
``opefo_rllib.envs``, ``algorithms/`` is ``opefo_rllib.algorithms``). ``LAYERS`` lists the
packages (and top-level modules) from the bottom up; a module may import its own layer and the
layers below it, never one above, and no two files may import each other, directly or around a
loop (lazy imports inside functions count too). The math layer, ``opefo_rllib.core``, imports only
torch and the standard library. Importing it (or the config) loads no Ray; ``import opefo_rllib``
still makes "GRPO" and "OPEFO" known to Ray Tune."""

import ast
import pathlib
import subprocess
import sys
import textwrap
import tomllib

from paths import REPO_ROOT

# Bottom up. A package's modules share its layer; a new package or top-level module must be placed here.
LAYERS = [
    "opefo_rllib.core",            # the math: token stats, entropy flow, balance, advantages, losses
    "opefo_rllib.config",          # typed settings sections, eval_tasks schema
    "opefo_rllib.configs",         # the shipped run configs (package data; no code)
    "opefo_rllib.quiet",           # known third-party notices silenced
    "opefo_rllib.checkpoints",     # run directories and checkpoint files
    "opefo_rllib.envs",            # Gymnasium text environments and the verifier
    "opefo_rllib.models",          # model loading, tokenizers, the RLModule
    "opefo_rllib.fleet",           # generation engines in Ray actors, weight transfer
    "opefo_rllib.rollout",         # prompts, sampling episodes, the learner batch
    "opefo_rllib.learner",         # DeepSpeed, data parallelism, export
    "opefo_rllib.evaluation",      # opefo eval, validation in training, compare
    "opefo_rllib.logging_tb",      # TensorBoard
    "opefo_rllib.progress",        # progress lines and bars
    "opefo_rllib.algorithms.grpo",   # RLlib: GRPOConfig + GRPO, the learner
    "opefo_rllib.algorithms.opefo",  # RLlib: OPEFOConfig + OPEFO
    "opefo_rllib.algorithms",
    "opefo_rllib.resources",       # what a config asks of the cluster
    "opefo_rllib.run_config",      # YAML run configs -> an AlgorithmConfig
    "opefo_rllib.training",        # train(): the library's training loop
    "opefo_rllib.supervisor",      # opefo train's driver process, restarted from the latest checkpoint
    "opefo_rllib.study_state",     # done / resumable / restart / new, from a run directory
    "opefo_rllib.study_report",    # OUT/results.md and curves.png of opefo study
    "opefo_rllib.study",           # opefo study
    "opefo_rllib.tools",           # scripts that build shipped files
    "opefo_rllib",                 # the package root: registers the algorithms
    "opefo_rllib.cli",             # the leaf: opefo train / eval / compare / study
]
STDLIB = set(sys.stdlib_module_names)


def _modules() -> dict[str, pathlib.Path]:
    """Module name -> file, by pyproject.toml's packages and package-dir mapping."""
    tool = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]
    modules = {}
    for package in tool["packages"]:
        top = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len)
        folder = REPO_ROOT / dirs[top] / pathlib.Path(*package[len(top):].split(".")[1:])
        for path in folder.glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every module this file imports, at top level or inside a function (``from pkg import sub``
    names the submodule when ``pkg.sub`` is a module)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return found


def _layer(module: str) -> int:
    owners = [i for i, unit in enumerate(LAYERS) if module == unit or module.startswith(unit + ".")]
    layer = max(owners, key=lambda i: len(LAYERS[i]), default=None)
    # the root owns only its __init__: a new module directly under it must be placed in LAYERS
    assert layer is not None and (LAYERS[layer] != "opefo_rllib" or module == "opefo_rllib"), \
        f"{module} is in no layer: place it (or its package) in LAYERS"
    return layer


def _internal(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def test_every_module_has_a_layer_and_imports_only_downwards():
    upward = []
    for name, path in sorted(MODULES.items()):
        for dep in sorted(_internal(_imports(name, path))):
            if _layer(dep) > _layer(name):
                upward.append(f"{path.relative_to(REPO_ROOT)} ({LAYERS[_layer(name)]}) imports {dep} ({LAYERS[_layer(dep)]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle_between_files():
    graph = {name: _internal(_imports(name, path)) - {name} for name, path in MODULES.items()}
    # an __init__ re-exporting its own submodules is a package's front door, not a cycle
    graph = {n: {d for d in deps if not (n.startswith(d + ".") and MODULES[d].stem == "__init__")} for n, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_math_imports_only_torch_and_the_standard_library():
    for name, path in MODULES.items():
        if _layer(name) != 0:
            continue
        for dep in _imports(name, path):
            top = dep.split(".")[0]
            assert top in STDLIB or top == "torch" or dep.startswith("opefo_rllib.core"), \
                f"{path.relative_to(REPO_ROOT)} imports {dep}"


def test_the_layers_are_named_in_order_and_all_exist():
    assert len(set(LAYERS)) == len(LAYERS)
    for unit in LAYERS:
        assert any(m == unit or m.startswith(unit + ".") for m in MODULES), f"LAYERS names {unit}, which is no module"


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_importing_the_math_and_the_config_loads_no_ray():
    out = _python("""
        import sys, time
        t = time.perf_counter()
        import opefo_rllib.core
        math_s = time.perf_counter() - t
        import opefo_rllib.config, opefo_rllib.rollout.batch
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"ray", "deepspeed", "vllm", "transformers"})
        print(heavy, f"{math_s:.2f}")
    """)
    heavy, seconds = out.strip().rsplit(" ", 1)
    assert heavy == "[]", heavy
    print(f"import opefo_rllib.core: {seconds} s")


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
