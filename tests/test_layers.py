"""The layer contract: flowrl's packages import only downward (DESIGN §2).

Every module of flowrl belongs to one layer below. A module may import modules of
lower layers and of its own package; never a higher layer, and never a sibling package
of its own layer (envs, policies and replay stay independent). Imports inside functions
and under ``TYPE_CHECKING`` count. A new package or top-level module must be given a
layer here, so that its place is decided once, on purpose.
"""

from __future__ import annotations

import ast
import os
import shutil

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flowrl")

# Bottom to top. Each entry: (layer name, packages or modules in it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("flowrl.version", "flowrl.imports")),
    ("flow", ("flowrl.flow",)),
    ("data", ("flowrl.data",)),
    ("envs | policies | replay", ("flowrl.envs", "flowrl.policies", "flowrl.replay")),
    ("workers", ("flowrl.workers",)),
    ("ops", ("flowrl.ops",)),
    ("algorithms", ("flowrl.algorithms",)),
    ("plans", ("flowrl.plans",)),
    ("serving | cli", ("flowrl.serving", "flowrl.cli")),
    # The package itself and the import paths kept from earlier releases.
    ("public", ("flowrl", "flowrl.agent", "flowrl.registry", "flowrl.sample_batch",
                "flowrl.callbacks")),
]


def module_names(root: str) -> dict[str, str]:
    """``{dotted module name: file path}`` of every module under ``root``."""
    package = os.path.basename(root)
    modules = {}
    for folder, _, files in os.walk(root):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                modules[rel.removesuffix(".__init__")] = path
    assert package in modules
    return modules


def group_of(module: str) -> str | None:
    """The entry of LAYERS that holds ``module`` (the longest matching prefix)."""
    best = None
    for _, groups in LAYERS:
        for group in groups:
            if module == group or (module.startswith(group + ".") and group != "flowrl"):
                if best is None or len(group) > len(best):
                    best = group
    return best if best is not None else ("flowrl" if module == "flowrl" else None)


def rank_of(group: str) -> int:
    return next(i for i, (_, groups) in enumerate(LAYERS) if group in groups)


def imported_modules(path: str, module: str, modules: dict[str, str]) -> set[str]:
    """flowrl modules that ``path`` imports anywhere (functions and TYPE_CHECKING too)."""
    tree = ast.parse(open(path).read(), path)
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: None if is_package else -1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def layer_violations(root: str) -> list[str]:
    """One line per import that goes up or sideways, or module without a layer."""
    modules = module_names(root)
    problems = []
    for module, path in sorted(modules.items()):
        group = group_of(module)
        if group is None:
            problems.append(f"{module} belongs to no layer: add it to LAYERS in "
                            "tests/test_layers.py (and docs/ARCHITECTURE.md)")
            continue
        for target in sorted(imported_modules(path, module, modules)):
            target_group = group_of(target)
            if target_group is None or target_group == group:
                continue
            if rank_of(target_group) < rank_of(group):
                continue
            how = "up" if rank_of(target_group) > rank_of(group) else "sideways"
            problems.append(f"{module} ({LAYERS[rank_of(group)][0]}) imports {target} "
                            f"({LAYERS[rank_of(target_group)][0]}): {how}")
    return problems


def test_flowrl_imports_only_downward():
    problems = layer_violations(ROOT)
    assert not problems, "layer contract broken:\n" + "\n".join(problems)


@pytest.mark.parametrize("planted_in, line, expected", [
    ("flow/iterators.py", "from flowrl.ops import TrainOneStep",
     "flowrl.flow.iterators (flow) imports flowrl.ops (ops): up"),
    ("workers/sampler.py", "    from flowrl.algorithms.registry import get_agent_class",
     "flowrl.workers.sampler (workers) imports flowrl.algorithms.registry (algorithms): up"),
    ("policies/models.py", "from flowrl.replay import ReplayBuffer",
     "flowrl.policies.models (envs | policies | replay) imports flowrl.replay "
     "(envs | policies | replay): sideways"),
])
def test_a_planted_upward_import_is_caught(tmp_path, planted_in, line, expected):
    copy = tmp_path / "flowrl"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / planted_in
    source = target.read_text()
    if line.startswith("    "):  # inside a function, which counts too
        source += f"\n\ndef _planted():\n{line}\n"
    else:
        source = f"{line}\n{source}"
    target.write_text(source)
    assert expected in layer_violations(str(copy))


def test_a_module_without_a_layer_is_caught(tmp_path):
    copy = tmp_path / "flowrl"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "helpers.py").write_text("import os\n")
    assert any(p.startswith("flowrl.helpers belongs to no layer")
               for p in layer_violations(str(copy)))
