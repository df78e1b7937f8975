"""Builds a Tokenizer from GGUF tokenizer metadata (tokenizer.ggml.*), byte-exact with llama.cpp's llama-vocab.cpp."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from corejax.errors import ModelFormatError, UnsupportedModelError
from corejax.tokenizer.base import CONTROL, NORMAL, Tokenizer

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"

# (regexes applied in turn, each splitting the pieces of the one before; ignore_merges) per
# tokenizer.ggml.pre name, copied from llama.cpp's llm_tokenizer_bpe table.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {}


def _register(names: str, regexes: tuple[str, ...], ignore_merges: bool = False) -> None:
    for name in names.split():
        PRE_TOKENIZERS[name] = (regexes, ignore_merges)


_register("default", (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_register("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2", (_LLAMA3,), ignore_merges=True)
_register("dbrx smaug-bpe", (_LLAMA3,))
_register("chatglm-bpe", (_LLAMA3,))
_register("glm4", (_LLAMA3,), ignore_merges=True)
_register("gpt-2 gpt2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de mellum modern-bert jina-v1-en "
          "jina-v2-code roberta-bpe mpt olmo jais exaone4 trillion", (_GPT2,))
_register("starcoder refact command-r smollm codeshell exaone minerva-7b", (r"\p{N}", _GPT2))
_register("qwen2 deepseek-r1-qwen stablelm2 megrez hunyuan", (_QWEN2,))
_register("qwen35", (_QWEN35,))
_register("falcon", (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))
_register("deepseek-coder", ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"))
_register("deepseek-llm", (
    "[\r\n]",
    # \u escapes: code points that Unicode normalization of this source file would otherwise change.
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
))
_register("poro-chat bloom gpt3-finnish", (_PORO,))
_register("viking", (_PORO, r"\p{N}"))
_register("tekken", (_TEKKEN,), ignore_merges=True)
_register("gpt-4o llama4", (_GPT4O,))

# Tokens llama.cpp also treats as end of generation when the file marks them as control tokens.
_EOG_TEXTS = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                        "<EOT>", "_<EOT>", "<|end▁of▁sentence|>", "<|return|>", "<|call|>", "<end_of_utterance>", "<turn|>"})


def _get(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return meta.get("tokenizer.ggml." + key, default)


def _token_id(meta: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    value = _get(meta, key)
    if value is None:
        return None
    value = int(value)
    if value == -1 or value == 0xFFFFFFFF:
        return None
    if not 0 <= value < vocab_size:
        raise ModelFormatError(f"tokenizer.ggml.{key} = {value} is outside the vocabulary of {vocab_size} tokens; "
                               "the file is corrupt: re-download or re-convert it")
    return value


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab[t] = i  # a text listed twice maps to its last id, as llama.cpp's token_to_id does
    return vocab


def _merge_pairs(merges: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges as (left, right) pairs, rank order; pairs whose parts are not tokens are dropped."""
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)  # from 1: llama.cpp's rule, so a merge may start with a space
        if cut < 0:
            raise ModelFormatError(f"tokenizer.ggml.merges holds {m!r}, which is not 'left right'; "
                                   "the file is corrupt: re-convert it")
        left, right = m[:cut], m[cut + 1:]
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
    return pairs


def _byte_level_segmenter(tokens: list[str], merges: list[str], pre: str):
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(f"the byte-level BPE pre-tokenizer {pre!r} is not implemented; supported: "
                                    f"{', '.join(sorted(PRE_TOKENIZERS))}")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    vocab = _vocab(tokens)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(merges, vocab), ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    def segment(text: str, prev_special: bool) -> list[int]:
        return hf.encode(text, add_special_tokens=False).ids

    return segment


def _score_merges(tokens: list[str], scores: np.ndarray, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges a sentencepiece BPE vocabulary implies, best score first.

    llama.cpp merges the adjacent pair whose concatenation is the highest-scoring token. HF's BPE, given
    every (left, right) pair whose halves and concatenation are tokens, ranked by that token's score,
    does the same. Cutting each token at every point finds all of them in O(total token length), instead
    of pairing tokens with each other in O(V^2).
    """
    lefts: list[str] = []
    rights: list[str] = []
    results: list[int] = []
    for text, i in vocab.items():
        for k in range(1, len(text)):
            left = text[:k]
            if left in vocab:
                right = text[k:]
                if right in vocab:
                    lefts.append(left)
                    rights.append(right)
                    results.append(i)
    order = np.argsort(-scores[np.asarray(results, dtype=np.int64)], kind="stable")
    return [(lefts[j], rights[j]) for j in order.tolist()]


def _spm_segmenter(tokens: list[str], scores: np.ndarray, add_space_prefix: bool):
    vocab = _vocab(tokens)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=_score_merges(tokens, scores, vocab),
                                byte_fallback=True, fuse_unk=False))

    def segment(text: str, prev_special: bool) -> list[int]:
        if add_space_prefix and prev_special:
            text = " " + text
        return hf.encode(text.replace(" ", "\u2581"), add_special_tokens=False).ids

    return segment


_LINES = re.compile(r"[^\n]+|\n+")


def _gemma4_segmenter(tokens: list[str], merges: list[str]):
    """Gemma 4 (tokenizer.ggml.model "gemma4"): BPE over raw UTF-8 characters with ranked merges, spaces
    spelled "▁", no dummy-prefix space, <0xXX> byte fallback.

    As llama.cpp: the text is cut into runs of newlines and runs of everything else, and each run is merged
    on its own; a run of newlines that is itself a token is taken whole, whatever the merges would make of it.
    """
    vocab = _vocab(tokens)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(merges, vocab), byte_fallback=True,
                                fuse_unk=False))

    def segment(text: str, prev_special: bool) -> list[int]:
        runs = _LINES.findall(text.replace(" ", "\u2581"))
        whole = [vocab.get(r) if r[0] == "\n" else None for r in runs]
        merged = iter(hf.encode_batch([r for r, w in zip(runs, whole) if w is None], add_special_tokens=False))
        ids: list[int] = []
        for w in whole:
            if w is None:
                ids.extend(next(merged).ids)
            else:
                ids.append(w)
        return ids

    return segment


def _wpm_segmenter(tokens: list[str], token_types: np.ndarray, unk_id: int | None):
    # GGUF spells BERT's vocabulary with a "phantom space": word starts as "▁word", continuations bare.
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if token_types[i] != NORMAL:
            key = t
        elif t.startswith("\u2581"):
            key = t[1:]
        else:
            key = "##" + t
        vocab.setdefault(key, i)
    unk = tokens[unk_id] if unk_id is not None else "[UNK]"
    hf = HFTokenizer(models.WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=100))
    hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                               lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    def segment(text: str, prev_special: bool) -> list[int]:
        return hf.encode(text, add_special_tokens=False).ids

    return segment


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """A Tokenizer from GGUF metadata (tokenizer.ggml.model "gpt2", "llama", "gemma4" or "bert")."""
    model = _get(meta, "model")
    tokens = _get(meta, "tokens")
    if model is None or tokens is None:
        raise ModelFormatError("the GGUF metadata has no tokenizer.ggml.model/tokens; this file carries no "
                               "tokenizer: load one with tokenizer_from_files")
    tokens = [str(t) for t in tokens]
    n = len(tokens)
    token_types = _get(meta, "token_type")
    token_types = np.full(n, NORMAL, np.int32) if token_types is None else np.asarray(token_types, np.int32)
    scores = _get(meta, "scores")
    scores = np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32)
    if token_types.shape != (n,) or scores.shape != (n,):
        raise ModelFormatError(f"the GGUF tokenizer lists {n} tokens but {token_types.shape[0]} types and "
                               f"{scores.shape[0]} scores; the file is corrupt: re-convert it")

    bos_id = _token_id(meta, "bos_token_id", n)
    eos_id = _token_id(meta, "eos_token_id", n)
    unk_id = _token_id(meta, "unknown_token_id", n)
    pad_id = _token_id(meta, "padding_token_id", n)
    eos_ids = {i for i in (eos_id, _token_id(meta, "eot_token_id", n), _token_id(meta, "eom_token_id", n))
               if i is not None}
    eos_ids |= {i for i, t in enumerate(tokens) if t in _EOG_TEXTS and token_types[i] == CONTROL}

    add_space_prefix = bool(_get(meta, "add_space_prefix", model == "llama"))
    if model == "gpt2":
        kind, strip = "bpe", False
        segment = _byte_level_segmenter(tokens, [str(m) for m in _get(meta, "merges", [])],
                                        str(_get(meta, "pre", "") or "default"))
        add_bos_default = False
    elif model == "llama":
        kind, strip = "spm", add_space_prefix
        segment = _spm_segmenter(tokens, scores, add_space_prefix)
        add_bos_default = True
    elif model == "gemma4":
        kind, strip = "spm", False
        merges = _get(meta, "merges")
        if merges is None:
            raise ModelFormatError("the GGUF tokenizer model 'gemma4' needs tokenizer.ggml.merges, which this file "
                                   "lacks; re-convert the model")
        segment = _gemma4_segmenter(tokens, [str(m) for m in merges])
        add_bos_default = True
        # llama.cpp also stops Gemma 4 at <|tool_response>, which the file marks user-defined, not control.
        eos_ids |= {i for i, t in enumerate(tokens) if t == "<|tool_response>"}
    elif model == "bert":
        kind, strip = "wpm", True
        segment = _wpm_segmenter(tokens, token_types, unk_id)
        add_bos_default = True
    else:
        raise UnsupportedModelError(f"the GGUF tokenizer model {model!r} is not implemented (corejax reads "
                                    "'gpt2', 'llama', 'gemma4' and 'bert'); convert the model with one of those")
    if kind == "wpm":
        # BERT: [CLS] text [SEP]; GGUF calls them bos/eos or cls/sep.
        bos_id = _token_id(meta, "cls_token_id", n) if bos_id is None else bos_id
        sep_id = _token_id(meta, "seperator_token_id", n)
        eos_id = sep_id if sep_id is not None else eos_id
    tok = Tokenizer(kind=kind, tokens=tokens, token_types=token_types, segment=segment, bos_id=bos_id,
                    eos_ids=eos_ids, eos_id=eos_id, pad_id=pad_id, unk_id=unk_id,
                    # As llama.cpp: Gemma 4 always starts with <bos>, whatever a converted file says.
                    add_bos=model == "gemma4" or bool(_get(meta, "add_bos_token", add_bos_default)),
                    add_eos=bool(_get(meta, "add_eos_token", kind == "wpm")),
                    strip_first_space=strip, chat_template=meta.get("tokenizer.chat_template"))
    return tok
