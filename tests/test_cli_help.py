"""What `--help` tells a user: whole sentences, and options described as each command uses them."""

from __future__ import annotations

import re

import pytest
from conftest import run_comfysync

from pipeline.cli import cli

COMMANDS = sorted(cli.commands)
#: Commands that only read local files: they make no request, so `--debug` logs none.
READ_COMMANDS = ("accounts", "browse", "changes", "config", "export", "history", "runs", "status")


def first_sentence(help_text: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(help_text.split("\n\n")[0].split())
    return paragraph[: paragraph.index(". ") + 1] if ". " in paragraph else paragraph


def listed_commands(stdout: str) -> dict[str, str]:
    """The Commands section of `--help`: each name with its text, wrapped lines joined."""
    section = stdout[stdout.index("Commands:\n") + len("Commands:\n") :]
    listed: dict[str, str] = {}
    name = ""
    for line in section.splitlines():
        found = re.match(r"  (\S+)\s+(.*)", line)
        if found and found.group(1) in cli.commands:
            name = found.group(1)
            listed[name] = found.group(2)
        elif line.strip():
            listed[name] += " " + line.strip()
    return listed


def option_help(stdout: str, option: str) -> str:
    """The help text of ``option`` in a command's `--help`, wrapped lines joined."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option + " "))
    text = [lines[start].split(option, 1)[1]]
    for line in lines[start + 1 :]:
        if line.lstrip().startswith("-"):
            break
        text.append(line)
    return " ".join(" ".join(text).split())


@pytest.mark.parametrize("columns", ["50", "80", "120"])
def test_the_command_list_shows_each_first_sentence_whole(tmp_path, columns):
    result = run_comfysync(tmp_path, "--help", env={"COLUMNS": columns})
    assert result.exit_code == 0, result.stderr
    listed = listed_commands(result.stdout)
    assert sorted(listed) == COMMANDS
    assert [name for name, text in listed.items() if text.endswith("...")] == []
    assert listed == {name: first_sentence(cli.commands[name].help or "") for name in COMMANDS}


def test_each_command_opens_with_a_short_complete_sentence():
    """Short enough for one line of the command list on an 80-column terminal."""
    for name in COMMANDS:
        sentence = first_sentence(cli.commands[name].help or "")
        assert sentence.endswith(".") and len(sentence) <= 64, (name, sentence)


@pytest.mark.parametrize("command", COMMANDS)
def test_debug_is_described_as_the_command_uses_it(tmp_path, command):
    result = run_comfysync(tmp_path, command, "--help")
    assert result.exit_code == 0, result.stderr
    described = option_help(result.stdout, "--debug")
    assert "traceback" in described
    if command in READ_COMMANDS:
        assert "request" not in described, described
    else:  # they talk to a simulated or real API, and --debug logs each request
        assert "request" in described, described
