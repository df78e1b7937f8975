"""The reply parser: generated text in, content, reasoning and complete tool calls out, piece by piece.

A small state machine over the text as it streams. Text that cannot start a marker (`<think>`, `</think>`,
`<tool_call>`, `[TOOL_CALLS]`, `<|python_tag|>`; a bare `{` or `[` opening a Llama 3 or Mistral reply) goes out
at once; a tail that may be the start of one is held until the next piece says. A call goes out whole when its
block closes (or, for formats without a closing marker, when the reply ends). A call that does not read as one
(bad JSON, an unknown function, over MAX_CALL_CHARS) goes out as the content it was: never an exception."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

from corejax.tools.formats import MAX_CALL_CHARS, MAX_CALLS, ChatFormat, read_calls
from corejax.types.results import Chunk, GenerationResult

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_OPEN = {"hermes": ("<tool_call>",), "generic": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",),
         "llama3": ("<|python_tag|>",)}
_BARE = {"mistral": "[", "llama3": "{"}  # a reply that opens with this is a call (the marker is a control token)
_CLOSE = {"hermes": "</tool_call>", "generic": "</tool_call>"}


def _held(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may be the start of a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


@dataclasses.dataclass
class Piece:
    content: str = ""
    reasoning: str = ""
    calls: list[dict] = dataclasses.field(default_factory=list)  # OpenAI's tool call objects with their index


class ReplyParser:
    """Reads one reply. tools: look for calls (of `names`; at most one unless `parallel`); reasoning: a reply
    that opens with <think> gives its thoughts apart."""

    def __init__(self, fmt: ChatFormat, names: frozenset[str] | None, *, tools: bool, parallel: bool = True,
                 reasoning: bool = False):
        self.fmt, self.names, self.tools, self.parallel = fmt, names, tools, parallel
        opened = reasoning and fmt.reasoning == "opened"  # the prompt ends with <think>: the reply starts inside
        self.state = "thinking" if opened else "opening" if reasoning else "content"
        self.buf = ""
        self.marker = ""  # the marker that opened the call being read
        self.fresh = True  # nothing but whitespace went out as content yet
        self.thought = opened  # a <think> block opened the reply
        self.searched = 0  # characters of buf already searched for a call's closing marker
        self.calls: list[dict] = []
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.opens = _OPEN.get(fmt.tools, ()) if tools else ()

    # --- output -------------------------------------------------------------------------------------------

    def _say(self, out: Piece, text: str) -> None:
        if self.fresh:
            if self.thought:
                text = text.lstrip()  # the blank line after </think>
            if text.strip():
                self.fresh = False
        if text:
            out.content += text
            self.content.append(text)

    def _think(self, out: Piece, text: str) -> None:
        if text:
            out.reasoning += text
            self.reasoning.append(text)

    def _call(self, out: Piece, body: str) -> bool:
        calls = read_calls(body, self.names)
        if calls is None or len(self.calls) + len(calls) > MAX_CALLS:
            return False
        for name, args in calls:
            if self.calls and not self.parallel:
                break  # parallel_tool_calls=false: the first call only
            # Mistral's templates take back only ids of 9 letters and digits
            call_id = uuid.uuid4().hex[:9] if self.fmt.tools == "mistral" else f"call_{uuid.uuid4().hex[:24]}"
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": args}}
            self.calls.append(call)
            out.calls.append({"index": len(self.calls) - 1, **call})
        return True

    # --- input --------------------------------------------------------------------------------------------

    def feed(self, text: str) -> Piece:
        out = Piece()
        self.buf += text
        while self._step(out):
            pass
        return out

    def _step(self, out: Piece) -> bool:
        """One transition on the buffer; False when it needs more text."""
        buf = self.buf
        if self.state == "opening":
            head = buf.lstrip()
            if THINK_OPEN.startswith(head) and len(head) < len(THINK_OPEN):
                return False  # "<thi" may still open a <think> block
            if head.startswith(THINK_OPEN):
                self.thought = True
                return self._to("thinking", head[len(THINK_OPEN):])
            return self._to("content", buf)
        if self.state == "thinking":
            at = buf.find(THINK_CLOSE)
            if at >= 0:
                self._think(out, buf[:at])
                return self._to("content", buf[at + len(THINK_CLOSE):])
            keep = _held(buf, (THINK_CLOSE,))
            self._think(out, buf[:len(buf) - keep])
            self.buf = buf[len(buf) - keep:]
            return False
        if self.state == "content":
            return self._content(out)
        if self.state == "call":
            close = _CLOSE.get(self.fmt.tools)
            at = buf.find(close, max(0, self.searched - len(close) + 1)) if close else -1  # new text only
            self.searched = len(buf)
            if at >= 0:
                if not self._call(out, buf[:at]):
                    self._say(out, self.marker + buf[:at + len(close)])
                return self._to("content", buf[at + len(close):])
            if len(buf) > MAX_CALL_CHARS:  # not a call: the rest is content
                self._say(out, self.marker + buf)
                self.opens = ()
                return self._to("content", "")
            return False
        self._say(out, buf)  # "plain"
        self.buf = ""
        return False

    def _to(self, state: str, buf: str) -> bool:
        self.state, self.buf, self.searched = state, buf, 0
        return True

    def _content(self, out: Piece) -> bool:
        buf = self.buf
        if not self.opens:
            self._say(out, buf)
            self.buf = ""
            return False
        hits = [(buf.find(m), m) for m in self.opens if m in buf]
        bare = _BARE.get(self.fmt.tools)
        if bare and self.fresh and not self.calls:
            head = buf.lstrip()
            if not head:
                return False  # only whitespace yet: a bare call may still open
            if any(m.startswith(head) and m != head for m in self.opens):
                return False  # "[" may be Mistral's "[TOOL_CALLS]" still coming
            if head.startswith(bare):
                hits.append((len(buf) - len(head), ""))
        if hits:
            at, marker = min(hits, key=lambda h: (h[0], -len(h[1])))  # the explicit marker before a bare one
            self._say(out, buf[:at])
            self.marker = marker
            return self._to("call", buf[at + len(marker):])
        keep = _held(buf, self.opens)
        self._say(out, buf[:len(buf) - keep])
        self.buf = buf[len(buf) - keep:]
        return False

    def finish(self) -> Piece:
        """What the reply's end decides: a call without its closing marker is read as it stands."""
        out = Piece()
        if self.state == "opening":
            self._say(out, self.buf)
        elif self.state == "thinking":
            self._think(out, self.buf)  # cut off while thinking (max_tokens)
        elif self.state == "call":
            if not self._call(out, self.buf):
                self._say(out, self.marker + self.buf)
        else:
            self._say(out, self.buf)
        self.buf, self.state = "", "plain"
        return out

    def result(self, result: GenerationResult) -> GenerationResult:
        """The worker's result with the text split into content, reasoning and calls."""
        reasoning = "".join(self.reasoning) if self.thought else None
        return dataclasses.replace(
            result, text="".join(self.content), tool_calls=tuple(self.calls), reasoning_content=reasoning,
            finish_reason="tool_calls" if self.calls else result.finish_reason)


def parse_chunks(chunks: Iterator[Chunk], parser: ReplyParser) -> Iterator[Chunk]:
    """A Session's chunk stream with its text parsed: content in Chunk.text, thoughts in Chunk.reasoning,
    each complete call in Chunk.tool_calls, and the last chunk's result split the same way."""
    for chunk in chunks:
        if chunk.result is None:
            piece = parser.feed(chunk.text)
            yield Chunk(piece.content, chunk.tokens, chunk.logprobs, tool_calls=tuple(piece.calls),
                        reasoning=piece.reasoning)
            continue
        piece = parser.finish()
        if piece.content or piece.reasoning or piece.calls:
            yield Chunk(piece.content, tool_calls=tuple(piece.calls), reasoning=piece.reasoning)
        yield Chunk("", result=parser.result(chunk.result))
