"""The output filter: a blocklist checked on generated text, in the worker, next to the detokenizer.

Patterns and output are compared after Unicode NFC normalisation and case folding (`str.casefold`), so a
blocked word cannot pass as another Unicode form ("cafe\\u0301" for "café") or another case ("ÉVIL", "Straße"
for "strasse"). A hit ends the generation with finish_reason "content_filter" (OpenAI's name for it), and
no part of the blocked word is ever emitted, also when it arrives over several tokens.

Streaming: the filter holds back only the text that could still become part of a match:
- the longest suffix of the pending text that could begin a pattern (compared in NFD form and case-folded,
  so that a base letter still waiting for its combining accent counts as the start of the accented letter), and
- the last character with the combining marks after it, which a mark in the next piece may still compose with
  (NFC composes across piece boundaries).
Everything before that is released at once. A match is always found in the text still held: released text
had no suffix that could begin a pattern.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path

from corejax.errors import InvalidParameterError

FINISH_REASON = "content_filter"


def normalise(text: str) -> str:
    """The form patterns and output are compared in: NFC, then case folded, then NFC again (case folding can
    produce sequences that compose, e.g. a folded capital with a combining mark)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())


def _decomposed(text: str) -> str:
    return unicodedata.normalize("NFD", text.casefold())


def _attaches(ch: str) -> bool:
    """Whether a character may compose with the one before it under NFC: combining marks, and the Hangul
    vowel and trailing jamo (conjoining letters compose into a syllable without being marks)."""
    return unicodedata.combining(ch) != 0 or "\u1160" <= ch <= "\u11ff"


class Blocklist:
    """Blocklist(["word", "a phrase"]): generation ends before any of these appears in the output.

    Patterns match anywhere in the text (substrings, not whole words): "bad" also stops "badge". Use a
    phrase with spaces around it (" bad ") to require word boundaries."""

    def __init__(self, patterns: Iterable[str]):
        if isinstance(patterns, str):
            patterns = [patterns]
        patterns = list(patterns)
        for p in patterns:
            if not isinstance(p, str) or not p.strip():
                raise InvalidParameterError(f"blocklist patterns must be non-empty strings; got {p!r}")
        self.patterns: tuple[str, ...] = tuple(dict.fromkeys(patterns))
        self._normal = tuple(dict.fromkeys(normalise(p) for p in self.patterns))
        # Proper prefixes of each pattern in NFD form: a pending suffix among them may still become a match.
        self._prefixes = {d[:i] for d in (_decomposed(p) for p in self.patterns) for i in range(1, len(d) + 1)}
        self._longest = max(len(d) for d in (_decomposed(p) for p in self.patterns)) if patterns else 0

    @classmethod
    def from_file(cls, path: str | Path) -> Blocklist:
        """One pattern per line (UTF-8); blank lines and lines starting with # are skipped."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidParameterError(f"cannot read the blocklist {path}: {e}") from None
        patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not patterns:
            raise InvalidParameterError(f"the blocklist {path} has no patterns (one per line; # starts a comment)")
        return cls(patterns)

    def to_wire(self) -> list[str]:
        return list(self.patterns)

    def __repr__(self) -> str:
        return f"Blocklist({len(self.patterns)} patterns)"

    def hit(self, text: str) -> bool:
        """Whether a pattern occurs in text (after normalisation)."""
        norm = normalise(text)
        return any(p in norm for p in self._normal)

    def stream(self) -> FilterStream:
        return FilterStream(self)


class FilterStream:
    """One generation's filter state: push text pieces, emit what push returns."""

    def __init__(self, blocklist: Blocklist):
        self._b = blocklist
        self._pending = ""
        self.blocked = False

    def push(self, piece: str) -> tuple[str, bool]:
        """Adds a piece; returns (text safe to emit now, whether a blocked pattern was hit). After a hit the
        generation must end: the text returned is what came before the match."""
        if self.blocked:
            return "", True
        pending = self._pending + piece
        # The last character may still compose with the next piece ("cafe" + "\u0301"), so a match is looked
        # for in the settled text before it; the last character stays held either way.
        last = _last_segment(pending)
        settled = pending[:len(pending) - last]
        if self._b.hit(settled):
            return self._block(settled)
        keep = max(last, self._could_begin(pending))
        self._pending = pending[len(pending) - keep:]
        return pending[:len(pending) - keep], False

    def flush(self) -> tuple[str, bool]:
        """At the end of the generation: (the held text, whether it completes a blocked pattern)."""
        pending, self._pending = self._pending, ""
        if self.blocked:
            return "", True
        if self._b.hit(pending):
            return self._block(pending)
        return pending, False

    def _block(self, text: str) -> tuple[str, bool]:
        self.blocked = True
        self._pending = ""
        return text[:self._match_start(text)], True

    def _could_begin(self, text: str) -> int:
        """The length of the longest suffix of text that could begin a pattern. Compared in NFD form, so a base
        letter still waiting for its accent counts as the accented letter's start; a suffix never gets shorter
        by decomposing or case folding, so none longer than the longest pattern needs a look."""
        for n in range(min(len(text), self._b._longest), 0, -1):
            if _decomposed(text[-n:]) in self._b._prefixes:
                return n
        return 0

    def _match_start(self, text: str) -> int:
        """The index in text where the first match begins: the first end e at which text[:e] holds a match,
        then the last start s with a match inside text[s:e]."""
        end = next(e for e in range(1, len(text) + 1) if self._b.hit(text[:e]))
        return next(s for s in range(end - 1, -1, -1) if self._b.hit(text[s:end]))


def _last_segment(text: str) -> int:
    """The length of text's last character with the characters that attach to it."""
    i = len(text) - 1
    while i > 0 and _attaches(text[i]):
        i -= 1
    return len(text) - i if text else 0
