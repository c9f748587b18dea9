"""The house rules that keep tinymath easy to change: layers that point one way (checked with
import-linter's contracts in pyproject.toml), short functions, a public API that stays callable."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80  # a function's body; the CLI's option declarations are its signature


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint)], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_layers_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, arrow", [
    ("base/errors.py", "from tinymath.lib.model import load_tokenizer"),  # base reaching up to a library
    ("lib/scoring.py", "from tinymath.services.evaluate import evaluate"),  # a library reaching up to a service
    ("services/merge.py", "from tinymath.services.train import train"),  # a service importing a service
])
def test_an_arrow_back_up_breaks_the_contract(tmp_path, module, arrow):
    shutil.copytree(ROOT / "tinymath", tmp_path / "tinymath")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "tinymath" / module
    target.write_text(target.read_text() + f"\n\ndef _arrow():\n    {arrow}\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout


def test_no_long_functions():
    long = []
    for path in sorted((ROOT / "tinymath").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into phases or helpers: " + ", ".join(long)


def test_every_public_function_can_be_called_twice(tmp_path):
    """Module names never shadow the public functions (calling one used to replace it by its module)."""
    import tinymath
    from tinymath.base.config import TrainConfig

    missing = tmp_path / "missing"
    calls = {
        "prepare_data": lambda: tinymath.prepare_data(data=str(missing), out=tmp_path / "prep"),
        "train": lambda: tinymath.train(TrainConfig(data=str(missing), lr=-1.0)),
        "merge_adapters": lambda: tinymath.merge_adapters(missing, tmp_path / "merged"),
        "evaluate": lambda: tinymath.evaluate(adapter=str(missing)),
        "compare": lambda: tinymath.compare(missing, missing),
        "evaluate_retention": lambda: tinymath.evaluate_retention(adapter=str(missing)),
    }
    functions = [name for name in tinymath.__all__ if callable(getattr(tinymath, name))
                 and name not in ("TinymathError", "extract_answer", "is_correct")]
    assert sorted(functions) == sorted(calls)
    for name, call in calls.items():
        for _ in range(2):
            with pytest.raises(tinymath.TinymathError):
                call()
        assert callable(getattr(tinymath, name)), name
    for _ in range(2):
        assert tinymath.extract_answer("so 3 + 4 = 7\n#### 7") == "7"
        assert tinymath.is_correct("#### 7.0", "#### 7")

