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


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports at run time, lazy imports inside functions included.

    Imports under ``if TYPE_CHECKING:`` are left out: they name types, they load nothing.
    ``from package import module`` counts as importing ``package.module``.
    """
    tree = ast.parse(path.read_text())
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if _type_checking_block(node)
        for child in ast.walk(node)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = {
                f"{node.module}.{alias.name}"
                for alias in node.names
                if (REPO / Path(*node.module.split("."), alias.name)).with_suffix(".py").exists()
            }
            # `from package import module` imports the module; the package only when it
            # also names something that is not a module of it.
            names.update(modules)
            if len(modules) < len(node.names):
                names.add(node.module)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PRODUCT = sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "jobs").rglob("*.py")])
IMPORTS = {module_name(path): imported_modules(path) for path in PRODUCT}


def internal(imports: set[str]) -> set[str]:
    """The product's own modules among ``imports``; ``pipeline`` itself (the version and the
    lazily re-exported public API) is everyone's."""
    return {m for m in imports if m.split(".")[0] in ("pipeline", "jobs") and m != "pipeline"}


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


#: What each sub-package of pipeline may import from pipeline (its own modules always).
#: The read side never reaches the write path, the source never touches the store, and
#: only the CLI reaches the simulator.
MAY_IMPORT = {
    "pipeline.source": {"pipeline.errors", "pipeline.settings", "pipeline.times"},
    "pipeline.store": {
        "pipeline.errors",
        "pipeline.settings",
        "pipeline.times",
        "pipeline.source.records",
    },
    "pipeline.read": {
        "pipeline.errors",
        "pipeline.settings",
        "pipeline.times",
        "pipeline.printable",
        "pipeline.source.records",
        "pipeline.store.schema",
        "pipeline.store.sqlite",
        "pipeline.store.keyfile",
        "pipeline.store.meta",  # the database's identifier, shown by status
        "pipeline.sync.lock",
        "pipeline.outputs.snapshot",
        "pipeline.outputs.objects",  # why a bucket could not be listed, for status
    },
    "pipeline.outputs": {
        "pipeline.errors",
        "pipeline.settings",
        "pipeline.times",
        "pipeline.store.schema",
        "pipeline.store.sqlite",
        "pipeline.read.history",
    },
    "pipeline.sync": {
        "pipeline.errors",
        "pipeline.settings",
        "pipeline.times",
        "pipeline.source",
        "pipeline.store",
        "pipeline.outputs",
        "pipeline.read.history",  # the fleet as of the sync, for its snapshots
    },
    "pipeline.observe": {
        "pipeline.errors",
        "pipeline.settings",
        "pipeline.times",
        "pipeline.printable",
        "pipeline.source.client",  # the retries counted where they happen
        "pipeline.store",  # the run log, and warnings added to a run's record
        "pipeline.sync.run",  # the sync it wraps
        "pipeline.sync.lock",
        "pipeline.sync.collector",  # the progress callback's type
        "pipeline.read.changelog",  # the changes a change notice reports
    },
    "pipeline.sim": {
        "pipeline.errors",
        "pipeline.source.records",  # the fields of a runner object the simulator serves
        "pipeline.settings",
        "pipeline.times",
        "pipeline.printable",
        "pipeline.store.schema",
        "pipeline.store.meta",
        "pipeline.store.keyfile",
        "pipeline.sync.run",
        "pipeline.sync.lock",
        "pipeline.read.changelog",
    },
}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_sub_package_imports_only_what_its_layer_allows(package):
    wrong = {
        (module, imported)
        for module, imports in IMPORTS.items()
        if within(module, package)
        for imported in internal(imports)
        if not within(imported, package, *MAY_IMPORT[package])
    }
    assert not wrong, f"{package} may not import: {sorted(wrong)}"


def test_nothing_imports_the_cli_and_only_the_cli_imports_jobs():
    for module, imports in IMPORTS.items():
        if module != "pipeline.cli":
            assert "pipeline.cli" not in imports, module
        if within(module, "pipeline") and module != "pipeline.cli":
            assert not any(within(m, "jobs") for m in imports), module


def test_only_the_cli_and_the_simulator_itself_import_the_simulator():
    users = {
        module
        for module, imports in IMPORTS.items()
        if any(within(m, "pipeline.sim") for m in imports) and not within(module, "pipeline.sim")
    }
    assert users == {"pipeline.cli"}


def test_no_module_imports_itself_back_through_others():
    graph = {
        m: {i for i in internal(imports) if i in IMPORTS and i != m}
        for m, imports in IMPORTS.items()
    }
    # A package's __init__ re-exporting its modules is no cycle through the code.
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_each_sub_package_says_what_lives_there_and_what_it_may_import():
    for init in sorted((REPO / "pipeline").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 30 and "import" in doc, init


def test_benchmarks_are_not_installed():
    """What `pip install` puts into site-packages is what pyproject's package list finds."""
    import tomllib

    from setuptools import find_packages

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = find_packages(where=str(REPO), **config["packages"]["find"])
    assert "pipeline.sync" in installed and "jobs" in installed
    assert not [name for name in installed if name.split(".")[0] in ("benchmarks", "tests")]


def test_sync_orchestration_contains_no_http_and_no_sql():
    for name in ("run.py", "collector.py", "plan.py", "guardrails.py"):
        path = REPO / "pipeline" / "sync" / name
        assert "sqlite3" not in imported_modules(path), name
        source = path.read_text()
        for sql in ("SELECT ", "INSERT ", "UPDATE ", '.get("/', "AsyncClient(", ".execute("):
            assert sql not in source, (name, sql)


def test_the_decisions_are_pure_functions_of_plain_values():
    for path in ("sync/plan.py", "sync/guardrails.py", "source/records.py"):
        imports = {m.split(".")[0] for m in imported_modules(REPO / "pipeline" / path)}
        assert not imports & {"sqlite3", "sqlite_utils", "httpx", "os", "asyncio"}, path


def test_each_heavy_dependency_lives_in_its_own_module():
    homes = {
        "click": {"pipeline/cli.py"},
        # Through pipeline.store.sqlite only, which keeps pandas out of every sync.
        "sqlite_utils": {"pipeline/store/sqlite.py"},
        "filelock": {"pipeline/sync/lock.py"},
        "pyarrow": {"pipeline/outputs/export.py"},
        "pandas": {"pipeline/read/frames.py"},
        "apscheduler": {"jobs/triggers.py", "jobs/scheduler.py"},
        "datasette": {"pipeline/read/browse.py"},
        "apprise": {"pipeline/observe/notify.py"},
        "prometheus_client": {"pipeline/observe/metrics.py"},
        "fsspec": {"pipeline/outputs/objects.py"},
        "s3fs": {"pipeline/outputs/objects.py"},
        "pyiceberg": {"pipeline/outputs/iceberg.py"},
        "sqlalchemy": {"pipeline/outputs/iceberg.py"},
    }
    for path in PRODUCT:
        imports = {m.split(".")[0] for m in imported_modules(path)}
        for library, allowed in homes.items():
            if library in imports:
                assert str(path.relative_to(REPO)) in allowed, f"{path} imports {library}"


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
        "         'filelock', 'jobs', 'datasette', 'apprise', 'prometheus_client'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines()[-1] == "[]"


def test_a_sync_never_loads_pandas_or_numpy():
    """sqlite-utils would import them (their start-up time and memory) if pipeline.store.sqlite
    did not prevent it."""
    code = "import sys, pipeline.sync.run, pipeline.cli; print(sorted({'pandas', 'numpy'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_sync_hands_no_connection_around_inside_the_walk():
    """The store owns the early writer's thread and the connection's handover: no callback
    the sync hands the walk finishes or abandons store work, and no sync module touches a
    connection or a transaction itself."""
    for path in sorted((REPO / "pipeline" / "sync").glob("*.py")):
        tree = ast.parse(path.read_text())
        for outer in ast.walk(tree):
            if not isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(outer):
                if inner is outer or not isinstance(inner, ast.FunctionDef | ast.Lambda):
                    continue
                called = {
                    node.func.attr
                    for node in ast.walk(inner)
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                }
                assert not called & {"finish", "abandon"}, (path.name, getattr(inner, "name", ""))
        source = path.read_text()
        for word in (".conn", "in_transaction", "rollback(", "commit("):
            assert word not in source, (path.name, word)


#: One owner per idea: text that spells the idea out, and the only modules allowed to.
OWNERS = {
    # "A time without an offset is UTC": pipeline.times.assume_utc.
    "tzinfo=UTC)": {"pipeline/times.py"},
    # ISO 8601 text to an instant: pipeline.times.utc_instant (the records keep their own
    # strict reader of what the API sends).
    "fromisoformat(": {"pipeline/times.py", "pipeline/source/records.py"},
    # The duration grammar of --since and --every.
    "[smhd": {"pipeline/times.py"},
    # The snapshot folder layout.
    "snapshot_date=": {"pipeline/outputs/snapshot.py"},
    "parts[-4:]": {"pipeline/outputs/snapshot.py"},
    # What counts as this machine.
    ".is_loopback": {"pipeline/settings.py"},
    # The run log's columns: the table (schema), the read side's list (history) and the
    # types the pandas API gives them (frames).
    '"total_reported"': {
        "pipeline/store/schema.py",
        "pipeline/read/history.py",
        "pipeline/read/frames.py",
    },
    "total_reported, ": set(),
    # The log formats of `schedule`.
    '"text", "json"': {"pipeline/cli.py"},
}


@pytest.mark.parametrize("text", sorted(OWNERS))
def test_each_idea_is_spelled_out_by_its_one_owner_only(text):
    holders = {str(path.relative_to(REPO)) for path in PRODUCT if text in path.read_text()}
    assert holders <= OWNERS[text], f"{text!r} is spelled out outside its owner: {holders}"


def test_the_cli_defines_db_once():
    assert (REPO / "pipeline" / "cli.py").read_text().count('"--db",') == 1
