"""`comfysync history "<a former name>"`: a runner is found by any name it ever had.

Real syncs against the simulator, renames upstream between them, and the command as a process.
A name that is some runner's name now still means that runner; only a name no runner has now
is looked up among the former names, and the output says which version had it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CliResult, run_comfysync

from pipeline.sim.simulator import LoopbackServer, SimulatedAccount

TOKEN = {"COMFYCONTROL_TOKEN": "test-token"}


@pytest.fixture(scope="module")
def mirror_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """Three syncs; runner 0 was alpha (v1), beta (v2), gamma (v3); runners 1 and 2 were both
    "shared" and became one and two; runner 3 was "taken" and runner 4 took that name."""
    folder = tmp_path_factory.mktemp("former-names")
    account = SimulatedAccount(runners=5, seed=3, token="test-token")
    ids = account.runner_ids()
    with LoopbackServer(account) as server:
        sync = ("sync", "--base-url", server.url, "--db", "m.db", "--no-export")
        for runner, name in zip(ids, ("alpha", "shared", "shared", "taken", "five"), strict=True):
            account.rename_runner(runner, name)
        assert run_comfysync(folder, *sync, env=TOKEN).exit_code == 0
        for runner, name in zip(ids, ("beta", "one", "two", "was-taken", "taken"), strict=True):
            account.rename_runner(runner, name)
        assert run_comfysync(folder, *sync, env=TOKEN).exit_code == 0
        account.rename_runner(ids[0], "gamma")
        assert run_comfysync(folder, *sync, env=TOKEN).exit_code == 0
    yield folder, ids


@pytest.fixture
def renamed(mirror_folder: tuple[Path, list[str]]) -> list[str]:
    return mirror_folder[1]


@pytest.fixture
def run_cli(mirror_folder: tuple[Path, list[str]]) -> Callable[..., CliResult]:
    """`comfysync` as a process in the folder of the mirror (read commands only)."""
    return functools.partial(run_comfysync, mirror_folder[0])


@pytest.mark.parametrize(("name", "version"), [("alpha", 1), ("beta", 2)])
def test_a_former_name_finds_the_runner_and_says_which_version_had_it(
    renamed, run_cli, name, version
):
    by_id = run_cli("history", renamed[0], "--db", "m.db")
    by_name = run_cli("history", name, "--db", "m.db")
    assert (by_name.exit_code, by_name.stderr) == (0, "")
    head, *versions = by_id.stdout.splitlines()
    assert head == f"{renamed[0]}  gamma  (present)"
    assert by_name.stdout.splitlines() == [
        head,
        f'  found by former name "{name}" (the name in v{version})',
        *versions,
    ]


def test_a_former_name_in_json_says_how_it_matched(renamed, run_cli):
    by_id = json.loads(run_cli("history", renamed[0], "--db", "m.db", "--json").stdout)
    by_name = json.loads(run_cli("history", "beta", "--db", "m.db", "--json").stdout)
    assert by_id["matched"] == {"by": "id", "version": None}
    assert by_name["matched"] == {"by": "former name", "version": 2}
    assert {**by_name, "matched": by_id["matched"]} == by_id
    assert [v["name"] for v in by_name["versions"]] == ["alpha", "beta", "gamma"]


def test_how_a_runner_matched_is_in_json_for_every_kind_of_match(renamed, run_cli):
    def matched(query: str) -> dict[str, object]:
        result = run_cli("history", query, "--db", "m.db", "--json")
        assert result.exit_code == 0, result.stderr
        return dict(json.loads(result.stdout)["matched"])

    assert matched(renamed[0]) == {"by": "id", "version": None}
    assert matched(renamed[0][:8]) == {"by": "id prefix", "version": None}
    assert matched("gamma") == {"by": "name", "version": None}
    assert matched("alpha") == {"by": "former name", "version": 1}


def test_a_current_name_wins_over_another_runners_former_name(renamed, run_cli):
    result = run_cli("history", "taken", "--db", "m.db")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{renamed[4]}  taken  (present)"
    assert "found by former name" not in result.stdout


def test_a_former_name_of_several_runners_lists_them_and_exits_2(renamed, run_cli):
    result = run_cli("history", "shared", "--db", "m.db")
    one, two = sorted([(renamed[1], "one"), (renamed[2], "two")])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"comfysync: error: 'shared' was a former name of 2 runners: {one[0]} ({one[1]}, "
        f"as v1), {two[0]} ({two[1]}, as v1); pass the id of one\n"
    )


def test_a_name_no_runner_ever_had_exits_2(renamed, run_cli):
    result = run_cli("history", "delta", "--db", "m.db")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "comfysync: error: no runner has or had the id, id prefix or name 'delta'; "
        "`comfysync changes --since 30d` lists recent ones\n"
    )
