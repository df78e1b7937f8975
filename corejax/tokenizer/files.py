"""Builds a Tokenizer from Hugging Face files: tokenizer.json (+ tokenizer_config.json) or a sentencepiece tokenizer.model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from corejax.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError, reads_untrusted
from corejax.tokenizer.base import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer
from corejax.tokenizer.gguf import tokenizer_from_gguf_metadata


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _decoder_kind(spec: dict) -> str:
    text = json.dumps(spec.get("decoder") or {})
    if "ByteLevel" in text:
        return "bpe"
    if "WordPiece" in text:
        return "wpm"
    return "spm"


@reads_untrusted("tokenizer.json or tokenizer_config.json")
def _from_tokenizer_json(path: Path, config: dict) -> Tokenizer:
    try:
        hf = HFTokenizer.from_file(str(path))
        # Some tokenizer.json files (all-MiniLM-L6-v2's) fix truncation and padding at 128; callers decide both.
        hf.no_truncation()
        hf.no_padding()
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - the tokenizers library's Rust panics are BaseExceptions (pyo3)
        raise ModelFormatError(f"{path} is not a readable tokenizer.json ({str(e)[:300]}); re-download it") from None
    if not isinstance(spec, dict):
        raise ModelFormatError(f"{path} holds a JSON {type(spec).__name__}, not a tokenizer")
    n = hf.get_vocab_size(with_added_tokens=True)
    tokens = [""] * n
    for text, i in hf.get_vocab(with_added_tokens=True).items():
        if 0 <= i < n:
            tokens[i] = text
    types = np.full(n, NORMAL, np.int32)
    for i, t in enumerate(tokens):
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = BYTE
    for added in spec.get("added_tokens", []):
        if 0 <= added["id"] < n:
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    kind = _decoder_kind(spec)

    def encode(text: str, add_special: bool, parse_special: bool) -> list[int]:
        hf.encode_special_tokens = not parse_special
        try:
            return hf.encode(text, add_special_tokens=add_special).ids
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a Rust panic (pyo3) on a hostile tokenizer.json
            raise ModelFormatError(f"{path} cannot encode this text ({str(e)[:300]})") from None
        finally:
            hf.encode_special_tokens = False

    token_id = {t: i for i, t in enumerate(tokens)}
    bos = token_id.get(_token_text(config.get("bos_token")) or "")
    eos = token_id.get(_token_text(config.get("eos_token")) or "")
    pad = token_id.get(_token_text(config.get("pad_token")) or "")
    unk = token_id.get(_token_text(config.get("unk_token")) or "")
    if kind == "spm" and unk is not None:
        types[unk] = UNKNOWN
    metaspace_prefix = '"prepend_scheme": "first"' in json.dumps(spec) or '"Prepend"' in json.dumps(spec)
    return Tokenizer(kind=kind, tokens=tokens, token_types=types, segment=lambda s, p: [], bos_id=bos,
                     eos_ids=[eos] if eos is not None else [], eos_id=eos, pad_id=pad, unk_id=unk,
                     add_bos=bool(config.get("add_bos_token", False)), add_eos=bool(config.get("add_eos_token", False)),
                     strip_first_space=kind == "wpm" or (kind == "spm" and metaspace_prefix),
                     chat_template=_chat_template(config), encode_override=encode)


def _chat_template(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


@reads_untrusted("tokenizer.model or tokenizer_config.json")
def _from_sentencepiece(path: Path, config: dict) -> Tokenizer:
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor()
    try:
        proc.Load(str(path))
    except Exception as e:
        raise ModelFormatError(f"{path} is not a readable sentencepiece model ({e}); re-download it") from None
    add_dummy_prefix, model_type = True, 2
    try:  # the normalizer spec lives only in the protobuf (needs the protobuf package)
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        model_type = proto.trainer_spec.model_type
        types = np.asarray([p.type for p in proto.pieces], np.int32)
    except ImportError:
        types = np.asarray([UNKNOWN if proc.IsUnknown(i) else CONTROL if proc.IsControl(i) else BYTE if proc.IsByte(i)
                            else UNUSED if proc.IsUnused(i) else NORMAL for i in range(proc.GetPieceSize())], np.int32)
    if model_type != 2:
        raise UnsupportedModelError(f"{path} is a sentencepiece model of type {model_type}; corejax reads only "
                                    "BPE sentencepiece models (type 2, as Llama and Gemma use)")
    n = proc.GetPieceSize()

    def special(name: str, fallback: int) -> int:
        token = _token_text(config.get(name))
        found = proc.PieceToId(token) if token else fallback
        return found if 0 <= found < n else -1

    meta = {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [proc.IdToPiece(i) for i in range(n)],
            "tokenizer.ggml.scores": np.asarray([proc.GetScore(i) for i in range(n)], np.float32),
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": special("bos_token", proc.bos_id()),
            "tokenizer.ggml.eos_token_id": special("eos_token", proc.eos_id()),
            "tokenizer.ggml.unknown_token_id": proc.unk_id(),
            "tokenizer.ggml.padding_token_id": special("pad_token", proc.pad_id()),
            "tokenizer.ggml.add_bos_token": config.get("add_bos_token", True),
            "tokenizer.ggml.add_eos_token": config.get("add_eos_token", False),
            "tokenizer.ggml.add_space_prefix": add_dummy_prefix}
    if _chat_template(config) is not None:
        meta["tokenizer.chat_template"] = _chat_template(config)
    return tokenizer_from_gguf_metadata(meta)


def tokenizer_from_files(folder_or_file: str | os.PathLike) -> Tokenizer:
    """A Tokenizer from a folder holding tokenizer.json or tokenizer.model (tokenizer_config.json beside it
    supplies BOS/EOS, add_bos_token and the chat template), or from either file directly."""
    path = Path(folder_or_file)
    folder = path if path.is_dir() else path.parent
    config_path = folder / "tokenizer_config.json"
    config: Any = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise ModelFormatError(f"{config_path} is not valid JSON ({str(e)[:200]}); re-download it") from None
        if not isinstance(config, dict):
            raise ModelFormatError(f"{config_path} holds a JSON {type(config).__name__}, not an object of settings")
    template_path = folder / "chat_template.jinja"
    if "chat_template" not in config and template_path.exists():
        config["chat_template"] = template_path.read_text(encoding="utf-8")
    candidates = [path] if path.is_file() else [folder / "tokenizer.json", folder / "tokenizer.model"]
    for candidate in candidates:
        if candidate.exists() and candidate.suffix == ".json":
            return _from_tokenizer_json(candidate, config)
        if candidate.exists():
            return _from_sentencepiece(candidate, config)
    raise ModelNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}; point at the model's folder")
