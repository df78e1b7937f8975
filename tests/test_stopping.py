"""Tests of corejax.serving.stopping.StopMatcher."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corejax.serving.stopping import StopMatcher


def _feed(stop, pieces):
    m = StopMatcher(stop)
    out, hit = [], False
    for piece in pieces:
        text, hit = m.push(piece)
        out.append(text)
        if hit:
            break
    return "".join(out) + m.flush(), hit, out


def _reference(text, stop):
    """Text before the first stop string to complete (earliest end, then earliest start)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stop if len(s) <= end and text[end - len(s):end] == s]
        if starts:
            return text[:min(starts)], True
    return text, False


def test_stop_across_piece_boundaries():
    m = StopMatcher(["</end>"])
    assert m.push("hello </") == ("hello ", False)
    assert m.push("en") == ("", False)
    assert m.push("d> ignored") == ("", True)
    assert m.flush() == ""
    assert m.push("more") == ("", True)


def test_partial_prefix_released_when_not_a_stop():
    m = StopMatcher(["STOP"])
    assert m.push("a ST") == ("a ", False)
    assert m.push("O") == ("", False)
    assert m.push("P!") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.push("a ST") == ("a ", False)
    assert m.push("OX") == ("STOX", False)
    assert m.push("end S") == ("end ", False)
    assert m.flush() == "S"


def test_multiple_stop_strings_first_to_complete_wins():
    assert _feed(["xyz", "\n\n"], ["one\n", "\ntwo xyz"])[:2] == ("one", True)
    assert _feed(["xyz", "\n\n"], ["one xy", "z\n\n"])[:2] == ("one ", True)
    # "bc" completes before "abcd" would: the cut is at "bc", not at "abcd"'s start
    assert _feed(["abcd", "bc"], ["xab", "cd"])[:2] == ("xa", True)
    # both end at the same place: cut at the earlier start so no part of a stop string is emitted
    assert _feed(["c", "abc"], ["xab", "c"])[:2] == ("x", True)


def test_overlapping_prefixes():
    # "aab": after "aa" a failed match must still find the stop starting one character later
    assert _feed(["aab"], ["a", "a", "a", "b", "tail"])[:2] == ("a", True)
    assert _feed(["abab"], ["aba", "ab", "ab"])[:2] == ("aba", True)
    assert _feed(["ab", "abc"], ["xa", "bc"])[:2] == ("x", True)
    m = StopMatcher(["aaa"])
    assert m.push("xaa") == ("x", False)
    assert m.push("a") == ("", True)


def test_unicode():
    assert _feed(["。", "終わり"], ["こんにちは終", "わり"])[:2] == ("こんにちは", True)
    assert _feed(["🛑"], ["ok 👍 ", "🛑 no"])[:2] == ("ok 👍 ", True)
    m = StopMatcher(["é!"])
    assert m.push("café") == ("caf", False)
    assert m.push("s") == ("és", False)


def test_no_stop_strings_passes_everything_through():
    m = StopMatcher([])
    assert m.push("abc") == ("abc", False)
    assert m.flush() == ""


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])


def test_holds_back_at_most_longest_minus_one():
    m = StopMatcher(["abcdef", "zz"])
    text, hit = m.push("xxabcde")
    assert (text, hit) == ("xx", False)
    text, hit = m.push("q")
    assert (text, hit) == ("abcdeq", False)


_alphabet = st.sampled_from(list("abé🙂\n"))


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet=_alphabet, max_size=40),
    stop=st.lists(st.text(alphabet=_alphabet, min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=12),
)
def test_emitted_plus_flush_is_text_before_first_stop(text, stop, cuts):
    bounds = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    got, hit, emitted = _feed(stop, pieces)
    want, want_hit = _reference(text, stop)
    assert (got, hit) == (want, want_hit)
    longest = max((len(s) for s in stop), default=1)
    # nothing more than (longest - 1) characters is ever held back
    if not hit:
        assert len(text) - len("".join(emitted)) <= longest - 1
