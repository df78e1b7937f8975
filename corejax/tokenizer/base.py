"""The Tokenizer every model uses: special-token partitioning, encode, byte-exact decode, streaming detokenizer."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from corejax.errors import InvalidParameterError, UnsupportedModelError
from corejax.tokenizer.chat import render_chat_template

# Token types, numbered as GGUF (tokenizer.ggml.token_type) and sentencepiece number them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_HIDDEN_WHEN_SKIPPING = (UNKNOWN, CONTROL, UNUSED)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_TO_UNICODE = _bytes_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_bytes(text: str) -> bytes:
    # A character outside GPT-2's table (rare, hand-added tokens) stands for its own UTF-8.
    return b"".join(bytes((_UNICODE_TO_BYTE[c],)) if c in _UNICODE_TO_BYTE else c.encode("utf-8") for c in text)


def _trie_pattern(strings: Iterable[str]) -> re.Pattern | None:
    """One regex that matches the longest of `strings` at a position, in time independent of how many there are."""
    trie: dict = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = {}
    if not trie:
        return None

    def build(node: dict) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in node.items() if ch != ""]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(build(trie), re.DOTALL)


class StreamDecoder:
    """Turns token ids pushed one at a time into text; only ever returns whole UTF-8 characters."""

    def __init__(self, tokenizer: "Tokenizer", *, skip_special: bool = True, continuation: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._strip_space = tokenizer._strip_first_space and not continuation
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        piece = self._tok._piece(token_id, self._skip_special)
        if not piece:
            return ""
        if self._strip_space:
            self._strip_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """The text of bytes still held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Text <-> token ids for one vocabulary; built by tokenizer_from_gguf_metadata or tokenizer_from_files.

    `segment(text, prev_was_special) -> ids` encodes one stretch of plain text (no special tokens in it);
    `kind` is "bpe" (byte-level), "spm" (▁ for space, <0xXX> byte fallback) or "wpm" (▁-prefixed words).
    """

    def __init__(self, *, kind: str, tokens: Sequence[str], token_types: np.ndarray,
                 segment: Callable[[str, bool], list[int]], bos_id: int | None, eos_ids: Iterable[int],
                 pad_id: int | None, unk_id: int | None, add_bos: bool, add_eos: bool = False,
                 strip_first_space: bool = False, chat_template: str | None = None,
                 encode_override: Callable[[str, bool, bool], list[int]] | None = None,
                 eos_id: int | None = None):
        self.kind = kind
        self.tokens = list(tokens)
        self.token_types = np.asarray(token_types, dtype=np.int32)  # [V]
        self.vocab_size = len(self.tokens)
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids) | ({eos_id} if eos_id is not None else set())
        self._eos_id = eos_id if eos_id is not None else (min(self.eos_ids) if self.eos_ids else None)
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.chat_template = chat_template
        self._segment = segment
        self._encode_override = encode_override
        self._strip_first_space = strip_first_space
        self._pieces: list[bytes | None] = [None] * self.vocab_size
        self._special_all, self._special_user = self._special_patterns()

    # -- encoding ---------------------------------------------------------------------------------------

    def _special_patterns(self) -> tuple[dict, dict]:
        # As llama.cpp: control, user-defined and unknown tokens are matched whole before the model sees
        # the text; user-defined ones even when parse_special is off.
        types = self.token_types
        by_text_all: dict[str, int] = {}
        by_text_user: dict[str, int] = {}
        for i in np.nonzero((types == CONTROL) | (types == USER_DEFINED) | (types == UNKNOWN))[0].tolist():
            text = self.tokens[i]
            if text:
                by_text_all.setdefault(text, i)
                if types[i] == USER_DEFINED:
                    by_text_user.setdefault(text, i)
        return ({"ids": by_text_all, "re": _trie_pattern(by_text_all)},
                {"ids": by_text_user, "re": _trie_pattern(by_text_user)})

    def _partition(self, text: str, parse_special: bool) -> Iterable[tuple[str, int | None]]:
        table = self._special_all if parse_special else self._special_user
        pattern = table["re"]
        if pattern is None:
            if text:
                yield text, None
            return
        start = 0
        for m in pattern.finditer(text):
            if m.start() > start:
                yield text[start:m.start()], None
            yield m.group(), table["ids"][m.group()]
            start = m.end()
        if start < len(text):
            yield text[start:], None

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; add_special adds BOS (and EOS) as the model asks; parse_special reads
        control tokens written in the text (e.g. "<|im_start|>") as those tokens, as llama.cpp does."""
        if not isinstance(text, str):
            raise InvalidParameterError(f"encode takes a str, got {type(text).__name__}; decode bytes first")
        if self._encode_override is not None:
            return self._encode_override(text, add_special, parse_special)
        ids: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            ids.append(self.bos_id)
        prev_special = True
        for piece, special_id in self._partition(text, parse_special):
            if special_id is None:
                ids.extend(self._segment(piece, prev_special))
                prev_special = False
            else:
                ids.append(special_id)
                prev_special = True
        if add_special and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    @property
    def eos_id(self) -> int | None:
        """The model's main end-of-sequence token (the one appended by add_special)."""
        return self._eos_id

    # -- decoding ---------------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` contributes to the text (control tokens: their own spelling)."""
        if not 0 <= token_id < self.vocab_size:
            raise InvalidParameterError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._compute_bytes(token_id)
        return piece

    def _compute_bytes(self, i: int) -> bytes:
        text, ttype = self.tokens[i], int(self.token_types[i])
        if ttype == BYTE:
            m = _BYTE_TOKEN.fullmatch(text)
            if m:
                return bytes((int(m.group(1), 16),))
        if ttype in _HIDDEN_WHEN_SKIPPING:
            return text.encode("utf-8")
        if self.kind == "bpe":
            return _byte_level_bytes(text) if ttype == NORMAL else text.encode("utf-8")
        if self.kind == "wpm" and ttype == NORMAL and text.startswith("##"):
            return text[2:].encode("utf-8")
        return text.replace("\u2581", " ").encode("utf-8")

    def _piece(self, token_id: int, skip_special: bool) -> bytes:
        if skip_special and 0 <= token_id < self.vocab_size and self.token_types[token_id] in _HIDDEN_WHEN_SKIPPING:
            return b""
        return self.token_bytes(int(token_id))

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """The text of `ids`; equals the concatenated output of a stream() fed the same ids."""
        stream = self.stream(skip_special=skip_special)
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def stream(self, *, skip_special: bool = True, continuation: bool = False) -> StreamDecoder:
        """A streaming detokenizer. continuation=True: the ids continue text already shown (a generation
        after its prompt), so a sentencepiece dummy-prefix space on the first token is kept, not stripped."""
        return StreamDecoder(self, skip_special=skip_special, continuation=continuation)

    # -- chat ------------------------------------------------------------------------------------------

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """Renders `messages` with the model's chat template (or `chat_template`), as HF transformers does."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise UnsupportedModelError("this model carries no chat template (a base model?); pass "
                                        "chat_template=... or encode plain text instead")
        variables = {"bos_token": self._token_text(self.bos_id) or "",
                     "eos_token": self._token_text(self.eos_id) or "",
                     "unk_token": self._token_text(self.unk_id) or "",
                     "pad_token": self._token_text(self.pad_id) or ""}
        variables.update(kwargs)
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)})"
