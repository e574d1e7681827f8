"""titletune/cleaning.py: the cleaning rules and the filters."""
from __future__ import annotations

import random
import re

import pyarrow as pa
import pytest

from titletune.cleaning import REASONS, clean_content, clean_table, clean_text, drop_reasons
from titletune.corpus import SCHEMA
from titletune.params import load_params
from titletune.testing import ROOT

DEFAULT_PATTERNS = [re.compile(p, re.IGNORECASE)
                    for p in load_params("preprocess", path=ROOT / "params.yaml").boilerplate_patterns]


# ---------------------------------------------------------------- the cleaning rules

def test_entities_hex_decimal_and_named_are_unescaped():
    raw = "Don&#x2019;t &#8217;em &#8211; Tom &amp; Jerry &quot;live&quot; &mdash; a&#160;b"
    assert clean_text(raw) == "Don\u2019t \u2019em \u2013 Tom & Jerry \"live\" \u2014 a b"


def test_double_escaped_entities_are_unescaped():
    assert clean_text("Tom&amp;#8217;s") == "Tom\u2019s"
    assert clean_text("AT&amp;amp;T") == "AT&T"
    assert clean_text("Q&A, R & D, &unknown; stay") == "Q&A, R & D, &unknown; stay"


def test_whitespace_is_normalised():
    assert clean_text("  a\n\tb  c\xa0d \u3000e\r\n") == "a b c d e"
    assert clean_text("&#160;&#160;") == ""


@pytest.mark.parametrize("tail", [
    "--This text refers to an out of print or unavailable edition of this title.",
    "--This text refers to the Paperback edition.",
    " -- this TEXT refers to the Hardcover edition.",
])
def test_boilerplate_tails_are_stripped(tail):
    assert clean_content("A gripping novel." + tail, DEFAULT_PATTERNS) == "A gripping novel."


def test_text_without_boilerplate_is_kept():
    text = "It refers to the text -- and this text is fine."
    assert clean_content(text, DEFAULT_PATTERNS) == text


def tricky_values(n: int, seed: int = 0) -> list[str]:
    pieces = ["plain words", "Caf\u00e9 \u2019quoted\u2019", "&#x2019;", "&#8217;", "&amp;", "&quot;",
              "&mdash;", "&#160;", "&amp;#8211;", "& alone", "  ", "\n", "\t", "\xa0", "\u2003",
              " ", "thePaperbackedition", "--This text refers to the Paperback edition.",
              "Copyright 1998 Reed Business Information, Inc.", "x", ""]
    rnd = random.Random(seed)
    return ["".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 8))) for _ in range(n)]


@pytest.mark.parametrize("patterns", [
    load_params("preprocess", path=ROOT / "params.yaml").boilerplate_patterns,   # RE2 picks the values
    [r"(?<=\.)\s*Copyright \d{4} Reed Business Information.*$"],     # Python-only: all values
    [],
])
def test_block_cleaning_equals_the_rules(patterns):
    """The fast whole-block path gives exactly what clean_text/clean_content give per value."""
    compiled = [re.compile(p, re.IGNORECASE) for p in patterns]
    titles, contents = tricky_values(400, seed=1), tricky_values(400, seed=2)
    table = pa.table({"uid": [f"u{i}" for i in range(400)], "title": titles, "content": contents},
                     schema=SCHEMA)
    out = clean_table(table, compiled).to_pylist()
    assert sorted(r["row"] for r in out) == list(range(400))
    for r in out:
        assert r["title"] == clean_text(titles[r["row"]])
        assert r["content"] == clean_content(contents[r["row"]], compiled)


def test_filters_give_one_reason_each():
    rows = [("A fine title", "A description that is long enough."),   # kept
            ("A fine title", ""),                                        # empty_content
            ("A fine title", "VHS Tape"),                                # short_content
            ("It", "A description that is long enough."),                # short_title
            ("Same text, twenty chars+", "Same text, twenty chars+"),    # content_equals_title
            ("", "")]                                                    # empty_content first
    table = pa.table({"title": [t for t, _ in rows], "content": [c for _, c in rows]})
    why = [REASONS[k] if k >= 0 else None for k in drop_reasons(table, 3, 20)]
    assert why == [None, "empty_content", "short_content", "short_title", "content_equals_title",
                   "empty_content"]
