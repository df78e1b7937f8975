"""Random-weight Llama GGUFs of real shapes, for measuring 1B-8B models without their weights.

    python benchmarks/shapes.py 1.1b [3b 8b] [--type Q4_0]      # prints each file's path

The package index carries no 1B-8B weights, and speed depends on shapes, not values. Each file has the named
model's layer count, widths, heads and KV heads, SmolLM2's tokenizer (its 49,152-token vocabulary, so the
embedding and output matrices are smaller than the real models'), normal random weights quantized by gguf-py's
own quantizers (llama.cpp's reference code in Python), and llama.cpp's tensor names and metadata, so llama.cpp
and corejax read the same file. Built once and cached under benchmarks/out/shapes/ (never checked in).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out" / "shapes"

# name -> (layers, hidden, heads, kv heads, ffn, rope theta): the real models' config.json values.
SHAPES = {
    "1.1b": (22, 2048, 32, 4, 5632, 10000.0),  # TinyLlama-1.1B
    "3b": (28, 3072, 24, 8, 8192, 500000.0),  # Llama-3.2-3B
    "8b": (32, 4096, 32, 8, 14336, 500000.0),  # Llama-3.1-8B
}
CONTEXT = 32768  # long enough for the 16k rows of the grid (the weights are random: no trained length to keep)


def path_for(name: str, qtype: str = "Q4_0") -> Path:
    return OUT / f"llama-{name}-shape-{qtype.lower()}.gguf"


def build(name: str, qtype: str = "Q4_0", *, progress: bool = True) -> Path:
    """The cached file, written first if missing (a temporary name until complete)."""
    import gguf

    from corejax import hub

    out = path_for(name, qtype)
    if out.exists():
        return out
    layers, d, heads, kv_heads, ffn, theta = SHAPES[name]
    head_dim = d // heads
    qt = gguf.GGMLQuantizationType[qtype]
    source = gguf.GGUFReader(hub.resolve("smollm2-135m-instruct", progress=progress).path)
    OUT.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".part")
    w = gguf.GGUFWriter(str(part), "llama")
    w.add_name(f"random llama {name} shape")
    w.add_block_count(layers)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type({"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}.get(qtype, 1))
    for key, field in source.fields.items():  # SmolLM2's tokenizer, as llama.cpp wrote it
        if key.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_array(key, value)
            else:
                w.add_key_value(key, value, vtype)
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(0)

    def add(tensor: str, shape: tuple[int, ...], kind=qt) -> None:
        x = rng.standard_normal(shape, np.float32) * np.float32(0.02)
        if len(shape) == 1:
            x = np.ones(shape, np.float32)
            kind = gguf.GGMLQuantizationType.F32
        w.add_tensor(tensor, gguf.quants.quantize(x, kind), raw_dtype=kind)

    add("token_embd.weight", (vocab, d), gguf.GGMLQuantizationType.Q8_0)
    add("output_norm.weight", (d,))
    add("output.weight", (vocab, d), gguf.GGMLQuantizationType.Q8_0)
    for i in range(layers):
        if progress:
            print(f"\r{out.name}: layer {i + 1}/{layers}", end="", file=sys.stderr, flush=True)
        add(f"blk.{i}.attn_norm.weight", (d,))
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, d))
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, d))
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, d))
        add(f"blk.{i}.attn_output.weight", (d, heads * head_dim))
        add(f"blk.{i}.ffn_norm.weight", (d,))
        add(f"blk.{i}.ffn_gate.weight", (ffn, d))
        add(f"blk.{i}.ffn_up.weight", (ffn, d))
        add(f"blk.{i}.ffn_down.weight", (d, ffn))
    if progress:
        print(file=sys.stderr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    part.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    ap.add_argument("--type", default="Q4_0", help="ggml type of the layer matrices (Q4_0, Q4_1, Q8_0)")
    args = ap.parse_args()
    for name in args.shapes:
        print(build(name, args.type))


if __name__ == "__main__":
    main()
