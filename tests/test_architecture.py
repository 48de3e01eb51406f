"""The package's layers, read from the code: who may import whom (imports inside functions included), no
cycles, and the size limits that keep the trainers readable."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trl_intrinsic"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every package module and the package modules it imports (at any depth of its code)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                    ).strip(".")
                candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name and candidate.startswith("trl_intrinsic"):
                    targets.add(candidate)
        graph[name] = targets
    return graph


GRAPH = _imports()


def _reaches(start: str, goal: str) -> bool:
    seen, stack = set(), list(GRAPH[start])
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(GRAPH.get(node, ()))
    return False


def _is_package_init(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


def test_no_import_cycle():
    # A package __init__ that lazily re-exports its submodules is not part of a cycle through them.
    cycles = [
        (a, b)
        for a, targets in GRAPH.items()
        for b in targets
        if not _is_package_init(a) and not _is_package_init(b) and _reaches(b, a)
    ]
    assert not cycles, cycles


def test_lower_layers_never_import_trainers_or_testing():
    for module, targets in GRAPH.items():
        if module.startswith(("trl_intrinsic.flow", "trl_intrinsic.autoregressive", "trl_intrinsic.rewards",
                              "trl_intrinsic.toyworld", "trl_intrinsic.seeding", "trl_intrinsic.data")):  # fmt: skip
            assert not any(t.startswith("trl_intrinsic.trainers") for t in targets), (module, targets)
        if module != "trl_intrinsic.testing" and module != "trl_intrinsic":
            assert "trl_intrinsic.testing" not in targets, module


def test_trainers_share_code_only_through_common():
    trainer_modules = [
        m for m in GRAPH if m.startswith("trl_intrinsic.trainers.") and m != "trl_intrinsic.trainers.common"
    ]
    for module in trainer_modules:
        family = module.rsplit(".", 1)[1].removesuffix("_config").removesuffix("_trainer")
        for target in GRAPH[module]:
            if not target.startswith("trl_intrinsic.trainers."):
                continue
            allowed = target in ("trl_intrinsic.trainers.common", "trl_intrinsic.trainers.grpo_math") or (
                target.rsplit(".", 1)[1].startswith(family)  # a trainer imports its own config
            )
            assert allowed, f"{module} imports {target}"


def test_toyworld_runtime_never_imports_its_pretraining_code():
    for module, targets in GRAPH.items():
        if module.startswith("trl_intrinsic.toyworld") and not module.startswith(
            "trl_intrinsic.toyworld.pretrain"
        ):
            assert not any(t.startswith("trl_intrinsic.toyworld.pretrain") for t in targets), (
                module,
                targets,
            )


@pytest.mark.parametrize(
    ("module", "limit"),
    [("trainers/flow_grpo_trainer.py", 650), ("trainers/intrinsic_grpo_trainer.py", 450)],
)
def test_trainer_modules_stay_short(module, limit):
    assert len((PACKAGE / module).read_text(encoding="utf-8").splitlines()) <= limit


def test_no_function_in_trainers_over_80_lines():
    long = []
    for path in (PACKAGE / "trainers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.end_lineno - node.lineno + 1 > 80
            ):
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
