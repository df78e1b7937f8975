"""Random-weight checkpoints of each decoder family corejax runs, built by transformers' own classes from a config of
the family's real layout (no download), and the same checkpoints converted to GGUF by llama.cpp's converter (from
the llama-cpp-python sdist, never built). Every weight is perturbed away from its init (biases from 0, norms from
1), so a dropped bias or a misplaced norm shows in the logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from tokenizer_testdata import LLAMA_CPP_PYTHON, cache_dir, llama_vocab_dir

# A small shape of each family; fields a family does not have are dropped by its config class.
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1000000.0)),
    "gemma2": ("Gemma2Config", dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                    tie_word_embeddings=True)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=4)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, attention_multiplier=0.11,
                                      residual_multiplier=0.22, logits_scaling=8.0)),
    "olmo2": ("Olmo2Config", dict()),
    # Mixtures of experts: top-2 of 8 (4) experts, renormalised (Qwen3-MoE as released, Mixtral) or not (OLMoE).
    "qwen3moe": ("Qwen3MoeConfig", dict(head_dim=32, rope_theta=1000000.0, num_experts=8, num_experts_per_tok=2,
                                        moe_intermediate_size=32, norm_topk_prob=True)),
    # OLMoE has no grouped-query attention (llama.cpp sizes its K norm by the hidden size).
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, num_key_value_heads=4)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # Phi-3.5 / Phi-4-mini's layout: fused q/k/v and gate/up, RoPE on half of each head (Phi-4-mini: 3/4),
    # LongRoPE (short factors within the original context), a sliding window.
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5, sliding_window=8, max_position_embeddings=2048,
                                original_max_position_embeddings=512, rope_scaling={
                                    "rope_type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.6],
                                    "long_factor": [1.5, 3.0, 6.0, 9.0], "original_max_position_embeddings": 512})),
}


# The architecture each family's GGUF declares (llama.cpp writes Llama 3, Mistral and Mixtral as "llama").
ARCH = {family: "llama" if family in ("llama3", "mistral", "mixtral") else family for family in FAMILIES}


def build(family: str, folder: Path, vocab_size: int, seed: int = 0, **overrides: Any) -> Any:
    """The random model (eval mode, float32) saved to `folder` as an HF checkpoint; returns the torch model."""
    import torch
    import transformers

    config_name, extra = FAMILIES[family]
    kw = dict(BASE, vocab_size=vocab_size, **{**extra, **overrides})
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**kw)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def converter_dir() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ package and gguf-py, from the pinned sdist."""
    llama_vocab_dir()  # downloads the sdist once
    out = cache_dir() / f"llama-convert-{LLAMA_CPP_PYTHON}"
    if (out / "convert_hf_to_gguf.py").exists():
        return out
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(cache_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix(prefix)
            if member.isfile() and member.name.startswith(prefix) and (
                    name == "convert_hf_to_gguf.py" or name.startswith(("conversion/", "gguf-py/"))):
                member.name = name
                tar.extract(member, out, filter="data")
    return out


def convert(folder: Path, out: Path, outtype: str = "f32") -> Path:
    """folder -> a GGUF written by llama.cpp's own converter (its metadata keys and tensor names)."""
    tool = converter_dir()
    env = dict(os.environ, PYTHONPATH=str(tool / "gguf-py"), NO_LOCAL_GGUF="")
    proc = subprocess.run([sys.executable, str(tool / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                           "--outtype", outtype], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {folder}:\n{proc.stderr[-3000:]}")
    return out


# What llama.cpp's converter cannot write: Mistral's sliding window (it writes Mistral as "llama" without one, and
# llama.cpp runs it so); its GGUF is checked on a Mistral v0.2/v0.3 layout, which has none. llama.cpp runs Phi-3
# without its window (its own logged TODO): its GGUF is checked on Phi-4-mini's layout, whose window is inert.
GGUF_OVERRIDES = {"mistral": {"sliding_window": None}, "phi3": {"sliding_window": None}}
# The converter reads a family's own kind of vocabulary: Gemma's and Phi-3's are SentencePiece (tokenizer.model).
SENTENCEPIECE = {"gemma2": 32000, "phi3": 32000}


def sentencepiece_model() -> Path:
    """Mistral's 32000-token SentencePiece model (the Llama 2 design), from the mistral-common wheel's data
    (downloaded once, --no-deps, never installed)."""
    out = cache_dir() / "tokenizer.model.v1"
    if out.exists():
        return out
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    "mistral-common==1.13.1", "-d", str(cache_dir())], check=True, capture_output=True)
    with zipfile.ZipFile(next(cache_dir().glob("mistral_common-1.13.1-*.whl"))) as wheel:
        out.write_bytes(wheel.read("mistral_common/data/tokenizer.model.v1"))
    return out


# ... and Qwen2's converter knows only Qwen's own byte-level BPE pre-tokenizer: llama.cpp's qwen2 vocabulary.
OWN_BPE = {"qwen2": "ggml-vocab-qwen2.gguf"}


def vocab_tokenizer(name: str) -> Path:
    """One of the sdist's vocab-only GGUFs as an HF tokenizer.json (read by transformers, cached)."""
    import transformers

    out = cache_dir() / f"hf-tokenizer-{Path(name).stem}"
    if not (out / "tokenizer.json").exists():
        tok = transformers.AutoTokenizer.from_pretrained(str(llama_vocab_dir()), gguf_file=name)
        tok.save_pretrained(out)
    return out


def add_vocabulary(family: str, folder: Path, bpe_tokenizer: Path) -> int:
    """Puts the tokenizer the family's converter reads into `folder`; returns its vocabulary size."""
    if family in SENTENCEPIECE:
        shutil.copy(sentencepiece_model(), folder / "tokenizer.model")
        return SENTENCEPIECE[family]
    if family in OWN_BPE:
        bpe_tokenizer = vocab_tokenizer(OWN_BPE[family])
    copy_tokenizer(bpe_tokenizer, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    ids = [*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer.get("added_tokens", []))]
    return max(ids) + 1


def copy_tokenizer(source: Path, folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
