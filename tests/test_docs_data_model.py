"""The data model page names every table, view and column of a synced database, in order,
with its declared type: the page is checked against the real schema, so it cannot drift."""

from __future__ import annotations

import re

import sqlite_utils
from conftest import REPO

PAGE = (REPO / "docs" / "data-model.md").read_text()
#: FTS5's own tables behind ``runners_fts``: SQLite's, described on the page in one sentence.
FTS_SHADOW = re.compile(r"runners_fts_(data|idx|docsize|config)")


def documented() -> dict[str, list[tuple[str, str]]]:
    """Each ``### `name` `` section of the page: its table's (column, type) rows."""
    sections = re.split(r"^### `([a-z_]+)`\n", PAGE, flags=re.MULTILINE)[1:]
    found = {}
    for name, body in zip(sections[::2], sections[1::2], strict=True):
        header = body.index("| column | type | meaning |")
        table = body[header : body.find("\n\n", header)]
        found[name] = re.findall(r"^\| `([a-z_]+)` \| ([A-Z]*) ?\|", table, flags=re.MULTILINE)
    return found


def test_the_data_model_page_documents_every_table_view_and_column_of_a_synced_database(mirror):
    db = sqlite_utils.Database(mirror.path)
    actual = {
        relation.name: [(column.name, column.type) for column in relation.columns]
        for relation in [*db.tables, *db.views]
        if not FTS_SHADOW.fullmatch(relation.name)
    }
    assert documented() == actual


def test_tables_and_views_are_under_their_headings():
    tables = PAGE[PAGE.index("\n## Tables\n") : PAGE.index("\n## Views\n")]
    views = PAGE[PAGE.index("\n## Views\n") :]
    assert re.findall(r"^### `(\w+)`", views, flags=re.MULTILINE) == [
        "current_runners",
        "runner_changes",
        "runner_tags",
    ]
    assert "### `runners`" in tables and "### `sync_runs`" in tables
