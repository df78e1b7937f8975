"""Host-side stop strings: finds them in streamed text and holds back what could still become one.

Semantics: generation stops at the first stop string to *complete* in the text (the earliest end; among
those ending at the same place, the one that starts first), the text is cut just before it, and the stop
string is never emitted. Text is released as soon as no stop string can start inside it, so a caller
streams everything except at most (longest stop string - 1) trailing characters.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds streamed text pieces through a set of stop strings."""

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        self._stop = tuple(s for s in stop)
        if any(not s for s in self._stop):
            raise ValueError("stop strings must be non-empty")
        # Every proper prefix of a stop string: a suffix of the text in this set must be held back.
        self._prefixes = {s[:i] for s in self._stop for i in range(1, len(s))}
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._buf = ""
        self.stopped = False

    def push(self, text_piece: str) -> tuple[str, bool]:
        """Adds a piece; returns (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        buf = self._buf + text_piece
        best: tuple[int, int] | None = None  # (end, start) of the first stop to complete
        for s in self._stop:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        if best is not None:
            self.stopped = True
            self._buf = ""
            return buf[:best[1]], True
        keep = 0
        for n in range(min(self._hold, len(buf)), 0, -1):
            if buf[-n:] in self._prefixes:
                keep = n
                break
        self._buf = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text at the end of the stream ('' once a stop string was hit)."""
        out, self._buf = ("" if self.stopped else self._buf), ""
        return out
