"""The import graph of the package: dependencies point one way, and there are no cycles.

Every ``import`` statement counts, at module level or inside a function (an import moved into
a function to dodge a cycle is still a cycle). Packages sit in layers; a module may import its
own package and the layers below, never one above. Packages in one layer do not import each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# top to bottom; a tuple is one layer of packages independent of each other
LAYERS = [
    ("cli",),
    ("zoo",),  # built-in models and data: plug into registries, imported only by the CLI (its `train`)
    ("api",),
    ("search",),
    ("recipes",),
    ("analysis",),
    ("runtime",),  # runs deployed files (ONNX Runtime, OpenVINO, LiteRT): what analysis times
    ("export",),
    ("artifact",),
    ("distillation",),
    ("pruning", "quantization", "lowrank"),
    ("engine",),
    ("tasks",),
    ("graph",),
    ("nn",),
    ("core",),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "modelpress").rglob("*.py"):
        rel = p.relative_to(SRC).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of this package it imports}`` (every import statement)."""
    files = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                candidates = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                # `from .x import y` needs x's package __init__ too, but that is the package itself
                if c in files and c != name and not name.startswith(c + "."):
                    deps.add(c)
        graph[name] = deps
    return graph


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the root package (its names are loaded lazily by string)
    for i, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return i
    return None


def test_every_package_has_a_layer():
    packages = {m.split(".")[1] for m in _modules() if m.count(".") >= 1}
    placed = {p for layer in LAYERS for p in layer}
    assert packages <= placed, f"packages without a layer: {sorted(packages - placed)} (add them to LAYERS)"


def test_dependencies_point_down():
    upward = []
    for module, deps in import_graph().items():
        a = _layer_of(module)
        for dep in deps:
            b = _layer_of(dep)
            if a is None or b is None or module.split(".")[1] == dep.split(".")[1]:
                continue
            if b <= a:  # same layer (independent packages) or a higher one
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def strongconnect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_zoo_and_transformers_stay_out_of_plain_imports():
    """Importing the API and loading a zoo model does not import transformers (the [nlp] extra)."""
    import subprocess
    import sys

    code = ("import modelpress.api, modelpress.zoo; from modelpress.artifact.loading import load_model; "
            "load_model('lenet5'); import sys; print('transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_reading_a_plain_artifact_imports_no_method_package(tmp_path):
    """Loading imports method modules only when the artifact names a class or rewrite of theirs."""
    import subprocess
    import sys

    code = ("import sys, torch; from modelpress.artifact.checkpoint import save_artifact; "
            "from modelpress.artifact.loading import load_artifact; "
            "m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), "
            "torch.nn.Linear(4 * 26 * 26, 2)); "
            f"save_artifact(m, r'{tmp_path / 'a.safetensors'}'); load_artifact(r'{tmp_path / 'a.safetensors'}', "
            "base_model=m); print(sorted({k.split('.')[1] for k in sys.modules if k.startswith('modelpress.')}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = ast.literal_eval(res.stdout.strip())  # the package names the child printed
    assert not {"pruning", "quantization", "lowrank", "distillation"} & set(loaded), loaded


def test_transformers_imports_next_to_a_torchvision_built_for_another_torch():
    """pip's torchvision is built for CUDA torch; its ops do not load beside the CPU build, which broke
    `import torchvision`, timm and transformers' model classes. The product prepares the import itself."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is None:
        import pytest

        pytest.skip("torchvision is not installed")
    code = ("from modelpress.artifact.hf import import_transformers; t = import_transformers(); "
            "t.BertModel(t.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
            "intermediate_size=37)); import torchvision; torchvision.models.resnet18(); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
