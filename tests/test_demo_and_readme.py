"""README's two commands and `comfysync demo`, as a new user meets them."""

from __future__ import annotations

import os
import shutil
import subprocess

from conftest import REPO, rows

README_LINES = (REPO / "README.md").read_text().splitlines()


def test_demo_exits_0_and_shows_what_changed(run_cli, tmp_path):
    result = run_cli("demo")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "1. first sync:  250 created, 0 updated, 0 deleted" in out
    assert "3. second sync: 1 created, 2 updated, 1 deleted, 0 restored, 247 unchanged" in out
    assert "[name, updated_at]" in out and "[headers, updated_at]" in out
    assert "comfysync browse --db data/demo.db" in out and "pd.read_sql" in out
    db = tmp_path / "data" / "demo.db"
    assert rows(db, "SELECT status FROM sync_runs") == [("success",), ("success",)]
    # Run twice: the demo starts afresh and prints the same thing.
    again = run_cli("demo")
    assert again.exit_code == 0
    assert again.stdout.splitlines()[4:] == out.splitlines()[4:]


def test_readme_opens_with_the_demo_line_then_the_test_line():
    first, second = README_LINES[0].strip(), README_LINES[1].strip()
    assert "pip install ." in first and first.endswith("comfysync demo")
    assert "pip install -e '.[test]'" in second and second.endswith("python -m pytest")


def test_ci_runs_the_readme_test_line_verbatim():
    ci = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert "sed -n 2p README.md" in ci and 'bash -euo pipefail -c "$test_command"' in ci


def test_the_readme_first_line_works_in_a_fresh_virtual_environment(tmp_path):
    """Install into a brand-new venv from a copy of the tree and run the demo, as a user would."""
    checkout = tmp_path / "checkout"
    shutil.copytree(
        REPO,
        checkout,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "data",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".mypy_cache",
            ".ruff_cache",
            "build",
            ".hypothesis",
            "results",
        ),
    )
    (checkout / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", README_LINES[0]],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3. second sync:" in proc.stdout
    assert (checkout / "data" / "demo.db").is_file()
