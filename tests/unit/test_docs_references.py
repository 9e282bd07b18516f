"""Every test the docs cite as evidence exists: a renamed or moved test must take its citation with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    }


def test_every_cited_test_file_and_function_exists() -> None:
    missing: list[str] = []
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for document in documents:
        for file_name, function in CITATION.findall(document.read_text(encoding="utf-8")):
            path = ROOT / file_name
            if not path.is_file():
                missing.append(f"{document.name}: {file_name}")
            elif function and function not in defined_tests(path):
                missing.append(f"{document.name}: {file_name}::{function}")
    assert missing == []
