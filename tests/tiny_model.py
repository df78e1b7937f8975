"""Writes tiny but complete GGUF models (random weights, a real byte-level BPE vocab, a chat template) so the
whole request path can be tested in seconds; gguf-py's writer is the independent producer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "e n", "Ġ o"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FIM = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]  # StarCoder's fill-in-the-middle tokens (fim=True)


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def vocab(fim: bool = False) -> tuple[list[str], list[int]]:
    specials = (FIM if fim else []) + SPECIALS
    tokens = _byte_tokens() + [m.replace(" ", "") for m in MERGES] + specials
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(specials)) + [gguf.TokenType.CONTROL] * len(specials)
    return tokens, [int(t) for t in types]


def write_tiny_llama(path: Path, *, arch: str = "llama", context: int = 64, layers: int = 2, hidden: int = 32,
                     heads: int = 4, kv_heads: int = 2, ffn: int = 64, quantize: str | None = "Q8_0",
                     seed: int = 0, chat_template: str | None = CHATML, unsupported_type: bool = False,
                     tie_embeddings: bool = True, name: str | None = None,
                     extra_tensors: dict[str, tuple] | None = None,
                     extra_metadata: dict[str, str | int | float] | None = None, fim: bool = False) -> Path:
    """A llama-architecture GGUF whose FFN matrices are stored quantized (Q8_0 by default). extra_tensors
    (name -> shape, random float32; or -> (shape, value), a constant) and extra_metadata (full key -> str, bool, int (uint32) or float (float32))
    plant what a loader must refuse. fim: StarCoder's FIM tokens in the vocabulary, named in the metadata as
    llama.cpp's converter names them."""
    rng = np.random.default_rng(seed)
    tokens, types = vocab(fim)
    if fim:
        extra_metadata = dict(extra_metadata or {}, **{f"tokenizer.ggml.fim_{k}_token_id": tokens.index(t)
                                                     for k, t in zip(("pre", "suf", "mid"), FIM)})
    v = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        w.add_name(name)
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(v - 3)
    w.add_eos_token_id(v - 1)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)

    def add(name: str, shape: tuple[int, ...], scale: float = 0.2) -> None:
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if len(shape) == 1:
            x = 1.0 + x * 0.1
        if unsupported_type and name == "blk.0.ffn_up.weight":
            q = np.zeros((shape[0], shape[1] // 32 * 40), np.uint8)  # Q8_1: 40 bytes per 32 values
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        elif quantize and name.startswith("blk.") and "ffn" in name and len(shape) == 2:
            qtype = gguf.GGMLQuantizationType[quantize]
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)

    head_dim = hidden // heads
    add("token_embd.weight", (v, hidden), 0.1)
    if not tie_embeddings:
        add("output.weight", (v, hidden))
    add("output_norm.weight", (hidden,))
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        add(f"blk.{i}.ffn_norm.weight", (hidden,))
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    for name, spec in (extra_tensors or {}).items():
        if isinstance(spec[0], tuple):  # (shape, value): a constant tensor
            w.add_tensor(name, np.full(spec[0], spec[1], np.float32))
        else:
            add(name, spec)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
