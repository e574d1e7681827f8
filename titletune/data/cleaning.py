"""The cleaning rules of preprocess, applied to whole Arrow blocks: one implementation of each.

Titles and contents: HTML entities unescaped (twice: scraped text is double-escaped), control
characters removed (ANSI escape sequences whole; they would reach prompts, samples and terminals),
every run of whitespace (Python's str.isspace) collapsed to one space and the ends trimmed. Contents also
lose each `preprocess.boilerplate_patterns` match (case-insensitive), after which whitespace is
collapsed again. Then the filters: every dropped record gets one reason of REASONS.
tests/test_cleaning.py holds the expected output of each rule.

Speed: RE2 (Arrow, C++) finds the values that need any work; Python runs only on those.
Safety: the boilerplate patterns run in the `regex` module (the syntax of `re`) with a time limit
per value, so a pattern that backtracks without end (`(a|aa)+$`) stops the stage with one line
instead of hanging it.
"""
from __future__ import annotations

import html
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import regex

from titletune.cli import UserError

# Every dropped record gets exactly one of these, the first that applies, in this order.
REASONS = ("malformed", "empty_content", "short_content", "short_title", "content_equals_title",
           "duplicate_uid", "duplicate_title_content", "over_max_records")

# html.unescape's own pattern. A match's replacement depends on the match alone, so it is
# cached: the corpus has a handful of distinct entities, repeated millions of times.
_ENTITY = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_UNESCAPED: dict[str, str] = {}


def _unescape_one(m: re.Match) -> str:
    ref = m[0]
    out = _UNESCAPED.get(ref)
    if out is None:
        out = _UNESCAPED[ref] = html.unescape(ref)
    return out


def unescape(s: str) -> str:
    """html.unescape, twice: scraped text has double escaping (&amp;#8217;)."""
    for _ in range(2):
        if "&" not in s:
            break
        s = _ENTITY.sub(_unescape_one, s)
    return s


# Control characters that are not whitespace (those are squeezed to spaces): C0 but tab to carriage
# return and \x1c-\x1f, DEL, C1 but NEL (\x85). Same syntax in RE2 and Python's re.
CONTROL = r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]"
# Removed whole: ANSI escape sequences (CSI `ESC [ ... m`, OSC `ESC ] ... BEL`, two-byte `ESC X`),
# else the other control characters one by one.
_CONTROL_RUN = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]|" + CONTROL)


def strip_control(s: str) -> str:
    return _CONTROL_RUN.sub("", s)


# Python's whitespace (str.isspace), in RE2 syntax.
_WS = r"\t-\r \x{1c}-\x{1f}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_WS_NOT_SPACE = _WS.replace(" ", "")
# A value needs work if it has an "&", a control character, or whitespace other than single spaces
# between words.
NEEDS_CLEANING = f"&|{CONTROL}|^[{_WS}]|[{_WS}]$|[{_WS_NOT_SPACE}]|  "
# A run of whitespace that " ".join(s.split()) would rewrite: not a lone space.
_WS_RUN = f"(?: *[{_WS_NOT_SPACE}]|  )[{_WS}]*"


def squeeze_spaces(col: pa.Array) -> pa.Array:
    """Every run of whitespace to one space, the ends trimmed (Python's " ".join(s.split()), in RE2)."""
    return pc.utf8_trim(pc.replace_substring_regex(col, _WS_RUN, " "), " ")


def re2_finds_all(pattern: str) -> bool:
    r"""Whether RE2 matches at least every value that Python's re matches, so it can pick the
    values to run Python on: ASCII patterns without Unicode-aware classes that RE2 compiles.
    (\s is safe: values that reach this test have single spaces as their only whitespace.)"""
    if not pattern.isascii() or re.search(r"\\[wWdDbB]", pattern):
        return False
    try:
        pc.match_substring_regex(pa.array([""]), f"(?i:{pattern})")
    except pa.ArrowInvalid:                        # Python-only syntax (lookbehind, ...)
        return False
    return True


# Seconds a pattern may take on one value: linear patterns take microseconds on a whole description.
PATTERN_TIMEOUT = 5.0


def compile_patterns(patterns: list[str]) -> list[regex.Pattern]:
    """preprocess.boilerplate_patterns as matched here: case-insensitive."""
    return [regex.compile(pattern, regex.IGNORECASE) for pattern in patterns]


def _timed(p: regex.Pattern, method, *args):
    """p.search(value) or p.sub(repl, value), or one line if it runs over PATTERN_TIMEOUT."""
    try:
        return method(*args, timeout=PATTERN_TIMEOUT)
    except TimeoutError:
        raise UserError(f"preprocess.boilerplate_patterns: {p.pattern!r} ran over {PATTERN_TIMEOUT:g} s on one "
                        f"description of {len(args[-1]):,} characters (it backtracks: nested or overlapping "
                        "repeats such as (a|aa)+ ?); rewrite it") from None


def strip_boilerplate(col: pa.Array, patterns: list[regex.Pattern]) -> pa.Array:
    """Remove each pattern in turn (then squeeze the spaces it leaves), running Python only on the
    values RE2 says match."""
    for p in patterns:
        if re2_finds_all(p.pattern):
            hit = pc.match_substring_regex(col, f"(?i:{p.pattern})")
        else:
            hit = pa.array([_timed(p, p.search, v) is not None for v in col.to_numpy(zero_copy_only=False)],
                           pa.bool_())
        if pc.any(hit).as_py():
            fixed = [_timed(p, p.sub, "", v) for v in col.filter(hit).to_numpy(zero_copy_only=False)]
            col = pc.replace_with_mask(col, hit, squeeze_spaces(pa.array(fixed, pa.string())))
    return col


def clean_table(table: pa.Table, patterns: list[regex.Pattern]) -> pa.Table:
    """The cleaning rules on a block: titles and contents unescaped, rid of control characters and
    squeezed, contents also stripped of the boilerplate patterns. Adds column `row` (the input row)
    because the rows that needed work come back after those that did not, and `control` (whether
    the title or the content lost control characters: counted in metrics/data.json)."""
    table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    table = table.append_column("control", pa.array(np.zeros(table.num_rows, dtype=bool)))
    if all(re2_finds_all(p.pattern) for p in patterns):
        content_re = "|".join([NEEDS_CLEANING] + [f"(?i:{p.pattern})" for p in patterns])
        dirty = pc.match_substring_regex(table["content"], content_re)
    else:
        dirty = pc.not_equal(table["content"], "")
    dirty = pc.or_(dirty, pc.match_substring_regex(table["title"], NEEDS_CLEANING))
    if not pc.any(dirty).as_py():
        return table
    fix = table.filter(dirty)
    columns, control = {}, np.zeros(fix.num_rows, dtype=bool)
    for name in ("title", "content"):
        unescaped = [unescape(v) for v in fix[name].to_numpy(zero_copy_only=False)]
        values = [strip_control(v) for v in unescaped]
        control |= np.array([len(a) != len(b) for a, b in zip(unescaped, values)], dtype=bool)
        columns[name] = squeeze_spaces(pa.array(values, pa.string()))
    columns["content"] = strip_boilerplate(columns["content"], patterns)
    fix = (fix.set_column(1, "title", columns["title"]).set_column(2, "content", columns["content"])
           .set_column(fix.schema.get_field_index("control"), "control", pa.array(control)))
    return pa.concat_tables([table.filter(pc.invert(dirty)), fix])


def drop_reasons(table: pa.Table, min_title_chars: int, min_content_chars: int) -> np.ndarray:
    """Per record, the index in REASONS of the filter that drops it, or -1 to keep it."""
    t_len = pc.utf8_length(table["title"]).to_numpy()
    c_len = pc.utf8_length(table["content"]).to_numpy()
    same = pc.equal(table["title"], table["content"]).to_numpy()
    return np.select(
        [c_len == 0, c_len < min_content_chars, t_len < min_title_chars, same],
        [REASONS.index(r) for r in ("empty_content", "short_content", "short_title",
                                    "content_equals_title")], -1)

