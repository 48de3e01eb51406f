"""The documentation site: it builds with no warnings, and its code is real.

* ``mkdocs build --strict`` succeeds (API reference from the docstrings, every nav page, every link);
* every Python block that imports from ``trl_intrinsic`` parses, the names it imports exist, and the
  keyword arguments it passes to them are accepted by their signatures;
* every repository file a page names (``examples/...``, ``trl_intrinsic/accelerate_configs/...``,
  ``benchmarks/...``) exists, so the docs never show a command that cannot run.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
REPO_PATH = re.compile(r"(?<![\w/.-])((?:examples|benchmarks|trl_intrinsic/accelerate_configs)/[\w./-]*\w)")


def _code_blocks(language: str) -> list[tuple[str, int, str]]:
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start()) + 1
                blocks.append((str(page.relative_to(ROOT)), line, match.group(2)))
    return blocks


def _imports_trl_intrinsic(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trl_intrinsic"):
            return True
        if isinstance(node, ast.Import) and any(a.name.startswith("trl_intrinsic") for a in node.names):
            return True
    return False


PYTHON_BLOCKS = _code_blocks("python")
LIBRARY_BLOCKS = [b for b in PYTHON_BLOCKS if "trl_intrinsic" in b[2]]


def test_docs_exist_and_have_library_snippets():
    assert (ROOT / "mkdocs.yml").is_file()
    assert len(PAGES) >= 10, [str(p) for p in PAGES]
    assert len(LIBRARY_BLOCKS) >= 5, "the guides should show library code"


@pytest.mark.parametrize("where,line,code", LIBRARY_BLOCKS, ids=[f"{w}:{n}" for w, n, _ in LIBRARY_BLOCKS])
def test_python_snippet_uses_real_names(where, line, code):
    tree = ast.parse(code, filename=f"{where}:{line}")
    assert _imports_trl_intrinsic(tree), f"{where}:{line} mentions trl_intrinsic but imports nothing from it"
    resolved: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trl_intrinsic"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}:{line}: {node.module} has no {alias.name!r}"
                resolved[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("trl_intrinsic"):
                    importlib.import_module(alias.name)

    # Keyword arguments passed to an imported name (or one of its attributes) must exist.
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.keywords:
            continue
        target = _resolve(node.func, resolved)
        if target is None:
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        params = signature.parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        for keyword in node.keywords:
            if keyword.arg is not None:
                assert keyword.arg in params, (
                    f"{where}:{line}: {ast.unparse(node.func)}() has no parameter {keyword.arg!r}"
                )


def _resolve(func: ast.expr, names: dict[str, object]) -> object | None:
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute):
        owner = _resolve(func.value, names)
        if owner is not None and (inspect.isclass(owner) or inspect.ismodule(owner)):
            return getattr(owner, func.attr, None)
    return None


@pytest.mark.parametrize("where,line,code", PYTHON_BLOCKS, ids=[f"{w}:{n}" for w, n, _ in PYTHON_BLOCKS])
def test_every_python_snippet_parses(where, line, code):
    ast.parse(code, filename=f"{where}:{line}")


def test_named_repository_files_exist():
    missing = []
    for page in PAGES:
        for path in REPO_PATH.findall(page.read_text(encoding="utf-8")):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "pages name files that do not exist:\n" + "\n".join(missing)


def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]' to build the documentation")
    site = tmp_path / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # The API reference is generated from the docstrings: anchors of the public names, and their text.
    api = (site / "api" / "trainers" / "index.html").read_text(encoding="utf-8")
    for anchor in (
        "flow_grpo_config.FlowGRPOConfig",
        "flow_grpo_trainer.FlowGRPOTrainer",
        "intrinsic_grpo_config.IntrinsicGRPOConfig",
        "intrinsic_grpo_trainer.IntrinsicGRPOTrainer",
    ):
        assert f'id="trl_intrinsic.trainers.{anchor}"' in api, anchor
    rewards = (site / "api" / "rewards" / "index.html").read_text(encoding="utf-8")
    for anchor in (
        "solace.SolaceReward",
        "solace.solace_reward",
        "nsc.nsc_reward",
        "external.CLIPScore",
    ):
        assert f'id="trl_intrinsic.rewards.{anchor}"' in rewards, anchor
    assert "The SOLACE self-confidence reward" in rewards
    flow = (site / "api" / "flow" / "index.html").read_text(encoding="utf-8")
    for anchor in (
        "sde.sde_step_with_logprob",
        "pipelines.FlowPipelineAdapter",
        "pipelines.register_flow_adapter",
    ):
        assert f'id="trl_intrinsic.flow.{anchor}"' in flow, anchor

    # The Benchmarks page carries every committed result table.
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    for result_file in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        assert f"benchmarks/results/{result_file.name}" in benchmarks
        header = next(
            line for line in result_file.read_text(encoding="utf-8").splitlines() if line.startswith("|")
        )
        first_column = header.strip("|").split("|")[0].strip()
        assert f"<th>{first_column}</th>" in benchmarks or first_column in benchmarks
