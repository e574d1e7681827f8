"""titletune/data/cleaning.py: each cleaning rule as input -> expected output, through clean_table (the
one implementation, the one preprocess runs), and the filters."""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from titletune.data.cleaning import REASONS, clean_table, compile_patterns, drop_reasons
from titletune.data.corpus import SCHEMA
from titletune.params import load_params
from titletune.testing import ROOT

DEFAULT = load_params("preprocess", path=ROOT / "params.yaml").boilerplate_patterns
PYTHON_ONLY = [r"(?<=\.)\s*Copyright \d{4} Reed Business Information.*$"]   # lookbehind: RE2 cannot


def cleaned(values: list[str], patterns: list[str] = DEFAULT, field: str = "content") -> list[str]:
    """clean_table on one column (the other one plain), back in input order."""
    other = "title" if field == "content" else "content"
    table = pa.table({"uid": [f"u{i}" for i in range(len(values))], field: values,
                      other: ["plain"] * len(values)}, schema=SCHEMA)
    rows = clean_table(table, compile_patterns(patterns)).to_pylist()
    assert sorted(r["row"] for r in rows) == list(range(len(values)))
    assert all(r[other] == "plain" for r in rows)
    return [r[field] for r in sorted(rows, key=lambda r: r["row"])]


# Titles and contents alike: entities unescaped (twice), whitespace squeezed.
TEXT_CASES = [
    ("Don&#x2019;t &#8217;em &#8211; Tom &amp; Jerry &quot;live&quot; &mdash; a&#160;b",
     "Don\u2019t \u2019em \u2013 Tom & Jerry \"live\" \u2014 a b"),            # hex, decimal, named
    ("Tom&amp;#8217;s", "Tom\u2019s"),                                         # double-escaped
    ("AT&amp;amp;T", "AT&T"),
    ("&amp;amp;amp;", "&amp;"),                                                # twice, not more
    ("Q&A, R & D, &unknown; stay", "Q&A, R & D, &unknown; stay"),             # not entities
    ("&amp &lt3 &copy2020", "& <3 \u00a92020"),                                # legacy, no semicolon
    ("  a\n\tb  c\xa0d \u3000e\r\n", "a b c d e"),                             # every whitespace
    ("a\u2003b\x1cc\u205fd\x85e", "a b c d e"),                                # ... Python's str.isspace
    ("a&#10;&#9;b", "a b"),                                                    # escaped whitespace too
    ("&#160;&#160;", ""),
    ("a\u200bb", "a\u200bb"),                                                  # zero-width: not space
    ("plain words", "plain words"),
    ("", ""),
]


@pytest.mark.parametrize("raw, expected", TEXT_CASES)
@pytest.mark.parametrize("field", ["title", "content"])
def test_entities_and_whitespace(raw, expected, field):
    assert cleaned([raw], field=field) == [expected]


@pytest.mark.parametrize("raw, expected", [
    ("A gripping novel.--This text refers to an out of print or unavailable edition of this title.",
     "A gripping novel."),
    ("A gripping novel.--This text refers to the Paperback edition.", "A gripping novel."),
    ("A gripping novel. -- this TEXT refers to the Hardcover edition.", "A gripping novel."),  # any case
    ("A  novel.\n--This text refers to the Paperback edition.  ", "A novel."),   # spaces squeezed after
    ("Caf&eacute; &amp; more--This text refers to the Kindle edition.", "Caf\u00e9 & more"),
    ("--This text refers to the Paperback edition.", ""),                         # then dropped: empty
    ("It refers to the text -- and this text is fine.", "It refers to the text -- and this text is fine."),
])
def test_boilerplate_is_stripped_from_contents(raw, expected):
    assert cleaned([raw]) == [expected]


def test_boilerplate_stays_in_titles_and_without_patterns():
    tail = "A novel.--This text refers to the Paperback edition."
    assert cleaned([tail], field="title") == [tail]
    assert cleaned([tail], patterns=[]) == [tail]


def test_a_pattern_re2_cannot_run_is_applied_in_python():
    raw = ["Great book. Copyright 1998 Reed Business Information, Inc.",
           "Great book Copyright 1998 Reed Business Information, Inc.",       # no full stop before
           "Fine &amp; dandy.  Copyright 2001 Reed Business Information"]
    assert cleaned(raw, patterns=PYTHON_ONLY) == [
        "Great book.", "Great book Copyright 1998 Reed Business Information, Inc.", "Fine & dandy."]


def test_patterns_apply_in_turn():
    assert cleaned(["Text. Note: remove me. Extra"], patterns=[r"Extra$", r"\s*Note:.*$"]) == ["Text."]


def test_any_input_comes_out_squeezed():
    """Whatever the pieces, no value keeps whitespace other than single spaces between words."""
    pieces = ["plain words", "Caf\u00e9 \u2019quoted\u2019", "&#x2019;", "&#8217;", "&amp;", "&quot;",
              "&mdash;", "&#160;", "&amp;#8211;", "& alone", "  ", "\n", "\t", "\xa0", "\u2003", " ", "x",
              "--This text refers to the Paperback edition.", "Copyright 1998 Reed Business Information, Inc."]
    rnd = random.Random(0)
    values = ["".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 8))) for _ in range(400)]
    for patterns in (DEFAULT, PYTHON_ONLY, []):
        for value in cleaned(values, patterns):
            assert value == value.strip() and "  " not in value
            assert not any(ch.isspace() and ch != " " for ch in value), repr(value)
            assert "This text refers" not in value or not patterns or patterns == PYTHON_ONLY


# Control characters (#22): gone from titles and contents; an ANSI escape sequence goes whole.
CONTROL_CASES = [
    ("\x1b[1;31mRED\x1b[0m Mug", "RED Mug"),                                  # SGR colours
    ("Mug\x1b[2J\x1b[H", "Mug"),                                              # clear screen, cursor home
    ("Mug \x1b]0;pwned title\x07 Blue", "Mug Blue"),                          # OSC: the window title
    ("Mug \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "Mug link"),           # OSC hyperlink, ST-ended
    ("a\x00b\x07c\x08d\x7fe\x9bf\x1bg", "abcdefg"),                         # NUL, BEL, BS, DEL, CSI (C1), lone ESC
    ("a\x1cb\x85c\td", "a b c d"),                                             # whitespace ones: squeezed to spaces
    ("&#27;[31m Mug", "[31m Mug"),                                             # html.unescape drops &#27; itself
    ("\x00\x01", ""),
    ("Caf\u00e9 \u2019s \u4e2d", "Caf\u00e9 \u2019s \u4e2d"),                       # text stays
]


@pytest.mark.parametrize("raw, expected", CONTROL_CASES)
@pytest.mark.parametrize("field", ["title", "content"])
def test_control_characters_are_removed_and_flagged(raw, expected, field):
    assert cleaned([raw], field=field) == [expected]
    other = "title" if field == "content" else "content"
    table = pa.table({"uid": ["u0"], field: [raw], other: ["plain"]}, schema=SCHEMA)
    flagged = clean_table(table, compile_patterns(DEFAULT))["control"].to_pylist()
    assert flagged == [any(ch in raw for ch in "\x00\x01\x07\x08\x1b\x7f\x9b")]


def test_filters_give_one_reason_each():
    rows = [("A fine title", "A description that is long enough."),   # kept
            ("A fine title", ""),                                        # empty_content
            ("A fine title", "VHS Tape"),                                # short_content
            ("It", "A description that is long enough."),                # short_title
            ("Same text, twenty chars+", "Same text, twenty chars+"),    # content_equals_title
            ("", "")]                                                    # empty_content first
    table = pa.table({"title": [t for t, _ in rows], "content": [c for _, c in rows]})
    why = [REASONS[k] if k >= 0 else None for k in drop_reasons(table, min_title_chars=3, min_content_chars=20)]
    assert why == [None, "empty_content", "short_content", "short_title", "content_equals_title",
                   "empty_content"]


def test_a_backtracking_pattern_is_one_line_not_a_hang(monkeypatch):
    """(a|aa)+$ takes ~1.6^n steps on a run of n a's that is not at the end: before, preprocess hung (#22;
    Python's re spent 48 s on (a+)+$ and 28 a's)."""
    from titletune.cli import UserError
    from titletune.data import cleaning
    monkeypatch.setattr(cleaning, "PATTERN_TIMEOUT", 0.5)
    value = "a" * 40 + "! and then a"                       # RE2 sees the match at the end: Python runs
    for pattern in (r"(a|aa)+$", r"(?<!x)(a|aa)+$"):          # found by RE2 first, or by Python alone
        with pytest.raises(UserError, match=r"^preprocess.boilerplate_patterns: '.*' ran over 0.5 s on one "
                                            r"description of 52 characters \(it backtracks"):
            cleaned([value], patterns=[pattern])
