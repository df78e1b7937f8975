"""The output filter (corejax/types/filter.py): NFC + case-folded matching, streamed without leaking a blocked word,
and in a real Session (sandboxed worker) ending a generation with finish_reason "content_filter"."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corejax import Blocklist, InvalidParameterError

PATTERNS = ["café", "STRASSE", "evil plan", "각"]


def _run(blocklist: Blocklist, pieces: list[str]) -> tuple[list[str], bool]:
    """(the pieces the filter released, whether it blocked)."""
    f, out = blocklist.stream(), []
    for piece in pieces:
        text, hit = f.push(piece)
        out.append(text)
        if hit:
            return out, True
    text, hit = f.flush()
    return out + [text], hit


@pytest.mark.parametrize("text, kept", [
    ("I like cafe\u0301 au lait", "I like "),  # decomposed é: another Unicode form of the pattern
    ("I like CAFÉ au lait", "I like "),  # another case
    ("the Straße is long", "the "),  # case folding maps ß to ss
    ("an Evil Plan here", "an "),
    ("Hangul \u1100\u1161\u11a8 jamo", "Hangul "),  # conjoining jamo compose to the syllable 각
    ("cafe only, no accent", None),  # "cafe" is not "café"
    ("caff\u00e8 is another word", None),  # è is not é
    ("nothing to see", None),
])
def test_blocks_every_form_and_case(text, kept):
    b = Blocklist(PATTERNS)
    out, hit = _run(b, [text])
    assert hit == (kept is not None)
    assert "".join(out) == (kept if kept is not None else text)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["I like cafe\u0301 au lait", "the STRAßE", "so an evil plan", "cafe, not caf\u00e9!",
                        "x\u1100\u1161\u11a8y", "plain text, nothing here", "evil pla", "caf"]),
       st.lists(st.integers(1, 30), max_size=8))
def test_streaming_never_leaks_part_of_a_match(text, cuts):
    """However the text is cut into pieces (tokens), the released text is the same as for the whole text, and
    no released prefix ever holds the start of the match that blocks it."""
    b = Blocklist(PATTERNS)
    points = sorted({c % len(text) for c in cuts} - {0})
    pieces = [text[i:j] for i, j in zip([0, *points], [*points, len(text)])]
    whole, whole_hit = _run(b, [text])
    out, hit = _run(b, pieces)
    assert ("".join(out), hit) == ("".join(whole), whole_hit)
    if hit:  # nothing of the blocked word went out, at any step
        released = "".join(out)
        assert not b.hit(released)
        assert len(released) <= len(text) and text.startswith(released)


def test_holds_back_only_what_could_become_a_match():
    f = Blocklist(["evil plan"]).stream()
    assert f.push("a harmless sentence and ") == ("a harmless sentence and", False)  # the last char is held
    assert f.push("an ev") == (" an ", False)  # "ev" could begin the pattern
    assert f.push("ening") == ("evenin", False)
    assert f.flush() == ("g", False)


def test_bad_patterns_and_files(tmp_path):
    with pytest.raises(InvalidParameterError, match="non-empty"):
        Blocklist(["ok", ""])
    path = tmp_path / "block.txt"
    path.write_text("# a comment\n\nCafé\n  evil plan  \n", encoding="utf-8")
    assert Blocklist.from_file(path).patterns == ("Café", "evil plan")
    (tmp_path / "empty.txt").write_text("# only comments\n")
    with pytest.raises(InvalidParameterError, match="no patterns"):
        Blocklist.from_file(tmp_path / "empty.txt")
    with pytest.raises(InvalidParameterError, match="cannot read"):
        Blocklist.from_file(tmp_path / "missing.txt")


def test_session_filter_in_the_worker(smollm2_gguf):
    """A real generation: the greedy text without the filter holds " Paris"; with "PARIS" blocked, the text ends
    before it and the finish reason is content_filter; streamed pieces never hold any of it."""
    from corejax import Session

    prompt = "The capital of France is"
    with Session(str(smollm2_gguf), progress=False) as s:
        free = s.generate(prompt, temperature=0, max_tokens=12)
    assert "Paris" in free.text
    with Session(str(smollm2_gguf), progress=False,
                 output_filter=Blocklist(["PARIS"])) as s:
        pieces = list(s.stream_chunks(prompt, temperature=0, max_tokens=12))
    result = pieces[-1].result
    assert result.finish_reason == "content_filter"
    assert result.text == free.text[:free.text.index("Paris")]
    assert "".join(p.text for p in pieces) == result.text
    assert unicodedata.normalize("NFC", result.text).casefold().find("paris") < 0
    with pytest.raises(InvalidParameterError, match="Blocklist"):
        Session(str(smollm2_gguf), output_filter=["PARIS"], progress=False)
