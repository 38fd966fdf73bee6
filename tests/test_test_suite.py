"""The suite's own house rules: a helper lives in one place, and tests hold to public seams.

A helper copied into two test files drifts; a test that imports another test module runs its
tests' imports and fixtures twice over; a test that reaches a private name breaks on every
refactor that keeps the behaviour.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SUITE = sorted(TESTS.glob("*.py"))

#: The private names tests still reach, each because no public seam shows what it pins.
PRIVATE_REACHED = {
    # The store's fast validity check must agree with the full one; only the pair shows it.
    ("test_records.py", "_describe_problem"),
    ("test_records.py", "_looks_valid"),
    ("test_timestamps.py", "_looks_valid"),
    # That a RunnerStore's own connection refuses writes; it exposes no connection.
    ("test_frames.py", "_db"),
    # TCP_NODELAY on the simulator's listening socket: accepted sockets are out of reach.
    ("test_simulator.py", "_listening_socket"),
    # The crash tests slow a patched snapshot batch by batch, to kill it half-written: no
    # public function runs once per batch of it.
    ("crash_harness.py", "_batches"),
    ("test_crashes.py", "_batches"),
}


def _trees() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text()) for path in SUITE}


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return body[1:]
    return body


def test_no_helper_is_defined_twice():
    """Same code under any name in two places: one of them should import the other's."""
    definitions: dict[str, list[str]] = defaultdict(list)
    for name, tree in _trees().items():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith(
                ("test_", "Test")
            ):
                code = ast.dump(ast.Module(body=_without_docstring(node.body), type_ignores=[]))
                definitions[code].append(f"{name}:{node.name}")
    assert [places for places in definitions.values() if len(places) > 1] == []


def test_no_test_module_imports_another():
    importing = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            importing += [f"{name}: {m}" for m in modules if m.split(".")[0].startswith("test_")]
    assert importing == []


def test_tests_reach_no_private_name_but_the_listed_ones():
    """Private names imported from the product, read off objects, or named as patch targets.

    Attributes a file's own classes define (``self._sock``) are that file's business.
    """
    private = re.compile(r"_[A-Za-z]\w*")
    target = re.compile(r"\bpipeline(?:\.\w+)+:(_\w+)")
    reached = set()
    for name, tree in _trees().items():
        own = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and isinstance(node.ctx, ast.Store)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.Attribute) and node.attr not in own:
                found = [node.attr]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found = target.findall(node.value)
            else:
                continue
            reached |= {(name, n) for n in found if private.fullmatch(n) and n != "_"}
    assert reached == PRIVATE_REACHED
