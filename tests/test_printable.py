"""``pipeline.printable``: text made safe for a terminal, and still telling distinct texts apart."""

from __future__ import annotations

import json
import logging
import sys

from hypothesis import given
from hypothesis import strategies as st

from pipeline.printable import PrintableFormatter, printable, printable_json, printable_lines

DANGEROUS = frozenset(
    chr(code)
    for code in (
        *range(0x00, 0x20),
        *range(0x7F, 0xA0),
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
        # Invisible format characters that can make two names look alike.
        0x061C,
        0x180E,
        0x200B,
        0x200E,
        0x200F,
        0x2060,
        0xFEFF,
        0xE0001,
        0xE0041,
    )
)
texts = st.text(
    st.one_of(
        st.sampled_from(sorted(DANGEROUS | {"\\", '"', "u", "n", "x", "0"})),
        st.characters(exclude_categories=("Cs",)),
    )
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


def decoded(shown: str) -> str:
    """What ``printable`` showed, read back: its escapes are JSON's, so a JSON string of it."""
    return str(json.loads('"' + shown.replace('"', '\\"') + '"'))


@given(texts)
def test_the_output_has_no_dangerous_character(text):
    assert not set(printable(text)) & DANGEROUS


@given(texts)
def test_the_output_reads_back_to_the_input_so_distinct_inputs_stay_distinct(text):
    assert decoded(printable(text)) == text


@given(texts, texts)
def test_two_texts_are_shown_alike_only_if_they_are_equal(first, second):
    assert (printable(first) == printable(second)) == (first == second)


@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\\")))
def test_a_text_without_controls_or_backslashes_is_shown_as_it_is(text):
    plain = "".join(char for char in text if char not in DANGEROUS)
    assert printable(plain) == plain


def test_the_escapes_are_json_s():
    assert printable("a\x1b[2Jb") == "a\\u001b[2Jb"
    assert printable("line\nforged\r\t\b\f") == "line\\nforged\\r\\t\\b\\f"
    assert printable("\x7f\x85\x9b") == "\\u007f\\u0085\\u009b"
    assert printable("\u2028\u2029\u202e\u2066") == "\\u2028\\u2029\\u202e\\u2066"
    assert printable("C:\\new") == "C:\\\\new"
    assert printable('say "hi"') == 'say "hi"'


@given(json_values)
def test_printable_json_keeps_json_exact_and_shows_no_dangerous_character(value):
    for text in (json.dumps(value, ensure_ascii=False), json.dumps(value, indent=2)):
        shown = printable_json(text)
        assert json.loads(shown) == value
        assert not set(shown) & (DANGEROUS - {"\n"})
        assert shown.count("\n") == text.count("\n")


@given(texts)
def test_the_log_formatter_escapes_the_message_but_keeps_a_traceback_s_lines(text):
    formatter = PrintableFormatter("comfysync: %(levelname)s: %(message)s")
    try:
        raise ValueError(f"boom {text}")
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord("pipeline", logging.WARNING, __file__, 1, "said %s", (text,), info)
    first, *traceback = formatter.format(record).split("\n")
    assert first == f"comfysync: WARNING: said {printable(text)}"
    assert traceback[0] == "Traceback (most recent call last):"
    # A newline in an exception's text still breaks the traceback's line: only there.
    assert "\n".join(traceback).endswith(f"ValueError: boom {printable_lines(text)}")
    assert not set("".join(traceback)) & DANGEROUS
    assert record.getMessage() == f"said {text}"  # other handlers still get the record as is


@given(st.lists(texts, max_size=5))
def test_printable_lines_escapes_each_line_and_keeps_the_line_breaks(lines):
    text = "\n".join(lines)
    assert printable_lines(text).split("\n") == [printable(line) for line in text.split("\n")]
