"""The documentation site: its navigation holds every page, and its CLI reference, rendered by
mkdocs-click from the click commands, shows every command with the help ``--help`` prints."""

from __future__ import annotations

import re

import markdown
from conftest import REPO

from pipeline.cli import cli

DOCS = REPO / "docs"


def nav_pages() -> list[str]:
    """The pages mkdocs.yml's nav lists, in order."""
    config = (REPO / "mkdocs.yml").read_text()
    nav = config[config.index("\nnav:\n") :]
    return re.findall(r"^  - [^:]+: (\S+\.md)$", nav, flags=re.MULTILINE)


def test_the_navigation_lists_every_page_once():
    pages = nav_pages()
    assert pages[0] == "index.md"
    assert sorted(pages) == sorted(path.name for path in DOCS.glob("*.md"))


def test_the_cli_reference_is_rendered_from_every_click_command():
    html = markdown.markdown((DOCS / "cli.md").read_text(), extensions=["mkdocs-click", "tables"])
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    assert set(cli.commands) == {
        "accounts",
        "browse",
        "changes",
        "config",
        "demo",
        "export",
        "history",
        "runs",
        "schedule",
        "simulate",
        "status",
        "sync",
    }
    for name, command in cli.commands.items():
        assert f"comfysync {name} [OPTIONS]" in text, name
        first_line = (command.help or "").strip().splitlines()[0]
        assert re.sub(r"\s+", " ", first_line) in text, name
        for option in command.params:
            for flag in option.opts:
                assert flag in text, f"{name} {flag}"
