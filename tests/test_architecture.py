"""The house rules that keep the code base small and honest, checked mechanically."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click
import pytest

import pipeline
from pipeline.cli import cli

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_flow_one_way_nothing_in_pipeline_imports_cli_or_jobs():
    for path in sorted((REPO / "pipeline").glob("*.py")):
        if path.name == "cli.py":
            continue
        wrong = {
            m for m in imported_modules(path) if m == "pipeline.cli" or m.split(".")[0] == "jobs"
        }
        assert not wrong, f"{path.name} imports {wrong}"


def test_sync_orchestration_contains_no_http_and_no_sql():
    imports = imported_modules(REPO / "pipeline" / "sync.py")
    assert "sqlite3" not in imports
    source = (REPO / "pipeline" / "sync.py").read_text()
    for sql in ("SELECT ", "INSERT ", "UPDATE ", '.get("/', "AsyncClient(", ".execute("):
        assert sql not in source, sql


def test_the_decisions_are_pure_functions_of_plain_values():
    for name in ("changes.py", "guardrails.py", "records.py"):
        imports = {m.split(".")[0] for m in imported_modules(REPO / "pipeline" / name)}
        assert not imports & {"sqlite3", "sqlite_utils", "httpx", "os", "asyncio"}, name


def test_each_heavy_dependency_lives_in_its_own_module():
    homes = {
        "click": {"cli.py"},
        # Through pipeline.sqlite only, which keeps pandas out of every sync.
        "sqlite_utils": {"sqlite.py"},
        "filelock": {"lock.py"},
        "pyarrow": {"export.py"},
        "pandas": {"frames.py"},
        "apscheduler": set(),
        "datasette": {"browse.py"},
    }
    for path in sorted((REPO / "pipeline").glob("*.py")):
        imports = {m.split(".")[0] for m in imported_modules(path)}
        for library, allowed in homes.items():
            if library in imports:
                assert path.name in allowed, f"{path.name} imports {library}"


def test_the_public_api_is_pinned():
    assert sorted(pipeline.__all__) == [
        "ComfySyncError",
        "RunnerStore",
        "Settings",
        "SyncSummary",
        "__version__",
        "run_sync",
    ]
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None


def all_commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        found.append((prefix + name, command))
        if isinstance(command, click.Group):
            found += all_commands(command, prefix + name + " ")
    return found


def test_every_command_and_option_has_help_text():
    for name, command in all_commands(cli):
        assert command.help, f"{name} has no help"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} has no help"


@pytest.mark.parametrize("command", ["sync", "schedule"])
def test_help_starts_without_importing_heavy_libraries(command):
    code = (
        "import sys; from pipeline.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'pandas', 'pyarrow', 'apscheduler', 'httpx', 'sqlite_utils', 'starlette',\n"
        "         'filelock', 'jobs', 'datasette'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines()[-1] == "[]"


def test_a_sync_never_loads_pandas_or_numpy():
    """sqlite-utils would import them (0.25 s, 80 MB) if pipeline.sqlite did not prevent it."""
    code = "import sys, pipeline.sync, pipeline.cli; print(sorted({'pandas', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_jobs_import_pipeline_never_the_cli_and_alone_know_apscheduler():
    for path in sorted((REPO / "jobs").glob("*.py")):
        assert "pipeline.cli" not in imported_modules(path), path.name
    users = {
        path.name
        for path in sorted(REPO.glob("*/*.py"))
        if "apscheduler" in {m.split(".")[0] for m in imported_modules(path)}
    }
    assert users == {"triggers.py", "scheduler.py"}
