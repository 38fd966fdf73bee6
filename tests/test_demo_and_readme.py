"""README's quick start and `comfysync demo`, as a new user meets them; CI runs the second."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from conftest import REPO, rows


def quick_start() -> list[str]:
    """The lines of the fenced block under README's "## Quick start" heading."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Quick start\n") :]
    block = re.search(r"^```\w*\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    assert block is not None and section.index(block.group(0)) < section.index("\n## ", 1)
    return block.group(1).splitlines()


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


def test_readme_opens_with_its_title_then_a_quick_start_of_the_demo_line_and_the_test_line():
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines[0] == "# comfysync"
    assert next(line for line in lines if line.startswith("## ")) == "## Quick start"
    first, second = quick_start()
    assert first == "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/comfysync demo"
    assert second == (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    )


def test_the_readme_says_how_to_put_comfysync_on_path_after_the_quick_start():
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Quick start\n") :]
    section = section[: section.index("\n## ", 1)]
    assert "run\n`. .venv/bin/activate` in your shell" in section


def test_readme_stays_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


def test_ci_finds_and_runs_the_readme_test_command_verbatim(tmp_path):
    """.ci/run's own lines, run on README.md, find exactly the quick start's test command."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in ci
    [finding] = [line for line in ci if line.startswith("test_command=")]
    assert "README.md" in finding and "sed -n 2p README.md" not in finding
    assert ci[ci.index(finding) + 1 :] == [
        'echo "+ $test_command"',
        'bash -euo pipefail -c "$test_command"',
    ]
    found = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f'{finding}\nprintf "%s" "$test_command"'],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert found == quick_start()[1]


def test_ci_builds_the_documentation_strictly():
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[test,docs]'" in ci
    assert "mkdocs build --strict" in ci


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
            "site",
        ),
    )
    (checkout / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", quick_start()[0]],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3. second sync:" in proc.stdout
    assert (checkout / "data" / "demo.db").is_file()
