"""The package's own import graph (from the source, function-level imports included): no cycles, and
every import points down the layers of DESIGN.md. Plus: `del model` frees a patched model at once."""
import ast
import gc
import pathlib
import weakref

import pytest
import torch

import braid_backend
from braid_backend.hf.compat import cache_kwarg_name, output_cache
from braid_backend.testing.presets import build_model
from helpers import toks

PKG = pathlib.Path(braid_backend.__file__).parent
# group -> the groups it may import (besides itself). runtime knows the DecodeStep interface and the
# kernels, never model/ or hf/; session/options/report know the runtime, not HF's side.
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "runtime": {"kernels"},
    "session": {"runtime", "kernels"},
    "hf": {"session", "runtime", "kernels"},
    "api": {"hf", "session", "runtime", "model", "kernels"},
    "testing": {"api", "hf", "session", "runtime", "model", "kernels"},
    "bench": {"testing", "api", "hf", "session", "runtime", "model", "kernels"},
}
# tuning.py holds only the frozen knobs and their reader: the kernels take it, so it sits with them
TOP = {"options": "session", "report": "session", "session": "session", "api": "api", "__init__": "api",
       "tuning": "kernels"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _group(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "api"
    return TOP.get(parts[1], parts[1]) if len(parts) == 2 and parts[1] in TOP else parts[1]


def _imports(mod: str, path: pathlib.Path, mods: dict) -> set[str]:
    """braid_backend modules imported anywhere in the file (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[:len(base) - node.level + 1]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import name`: name may be a submodule
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:
                n = n.rpartition(".")[0]
            if n and n != mod:
                found.add(n)
    return found


def upward_imports(graph: dict) -> list:
    return sorted((m, d) for m, deps in graph.items() for d in deps
                  if _group(d) != _group(m) and _group(d) not in ALLOWED[_group(m)])


def find_cycles(graph: dict) -> list:
    colour, stack, cycles = {}, [], []

    def visit(m):
        colour[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if colour.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in colour:
                visit(d)
        stack.pop()
        colour[m] = 2

    for m in sorted(graph):
        if m not in colour:
            visit(m)
    return cycles


def test_import_graph_is_acyclic_and_points_down():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert "braid_backend.hf.verify" in graph["braid_backend.hf.runner"], "the parser must see imports"
    assert not upward_imports(graph), f"imports that reach up or sideways a layer: {upward_imports(graph)}"
    assert not find_cycles(graph), f"import cycles: {find_cycles(graph)}"


def test_the_checks_catch_what_they_guard(tmp_path):
    """A function-level upward import from runtime/ into model/, and a two-file cycle, are reported."""
    mods = {"braid_backend.runtime.x": tmp_path / "x.py", "braid_backend.model.step": tmp_path / "step.py"}
    mods["braid_backend.runtime.x"].write_text("def f():\n    from ..model.step import DecodeStep\n")
    deps = _imports("braid_backend.runtime.x", mods["braid_backend.runtime.x"], mods)
    assert deps == {"braid_backend.model.step"}
    assert upward_imports({"braid_backend.runtime.x": deps}) == [("braid_backend.runtime.x", "braid_backend.model.step")]
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


def test_kernels_do_not_import_transformers():
    for path in (PKG / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(n.split(".")[0] == "transformers" for n in names), path.name


def _exercise(model):
    """Everything that allocates on the patched side: the shared cache and the K-step loop
    (generate), a forward-made cache and eager step buffers (teacher forcing)."""
    ids = toks(model, 2, 5, 3)
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
        model(ids[:, -1:], use_cache=True, **{cache_kwarg_name(model): cache})


@pytest.fixture
def no_gc():
    """Only reference counting may free things: a cycle would keep them alive."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3-moe"])   # the MoE step holds its own workspace
def test_del_model_frees_everything_without_gc(no_gc, preset):
    model = build_model(preset, dtype=torch.float32, seed=4)
    assert braid_backend.patch(model, graph_steps=2).ok
    _exercise(model)
    s = model._braid_session   # internals: weak references to everything the session holds
    assert s.cache is not None and s.loops and s._eager, "the exercise should allocate every kind of state"
    refs = {"model": model, "session": s, "step": s.step, "cache": s.cache, "packed qkv": s.step.layers[0].w_qkv,
            "loop": next(iter(s.loops.values())), "report": s.report}
    refs = {k: weakref.ref(v) for k, v in refs.items()}
    del s, model
    alive = [k for k, r in refs.items() if r() is not None]
    assert not alive, f"still alive after `del model` without the cyclic GC: {alive}"


def test_unpatch_frees_the_session_without_gc(no_gc):
    model = build_model("tiny-llama", dtype=torch.float32, seed=5)
    braid_backend.patch(model, graph_steps=2)
    _exercise(model)
    s = model._braid_session   # internals: weak references to what unpatch must free
    refs = [weakref.ref(x) for x in (s, s.step, s.cache, s.step.layers[0].w_qkv)]
    del s
    braid_backend.unpatch(model)
    assert all(r() is None for r in refs), [r() is not None for r in refs]
    assert not braid_backend.is_patched(model)


def test_stock_model_is_freed_too(no_gc):
    """Control: the same check on an unpatched model (so the test above measures the patch, not HF)."""
    model = build_model("tiny-qwen2", dtype=torch.float32, seed=4)
    model.generate(toks(model, 1, 4, 1), max_new_tokens=2, do_sample=False, pad_token_id=0)
    ref = weakref.ref(model)
    del model
    assert ref() is None
