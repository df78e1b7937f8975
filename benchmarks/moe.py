"""A mixture-of-experts model, corejax beside llama.cpp on the same GGUF in one run.

    python benchmarks/moe.py [--experts 32 --used 4 --hidden 1024 --layers 12 --expert-ffn 512] [--outtype q8_0]

No MoE weights are on the package index, so the model is random weights of Qwen3-MoE's real layout (built by
transformers' own Qwen3MoeForCausalLM, SmolLM2's tokenizer) converted by llama.cpp's own convert_hf_to_gguf.py
(tests/families.py has both), cached under benchmarks/out/moe-*/. Then `corejax bench --suite generation` on that
file with the corejax and llama.cpp runtimes: prefill and decode tokens/s side by side, alternated per prompt,
the table printed and the record written to benchmarks/out/moe.json. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build_gguf(args: argparse.Namespace) -> Path:
    import transformers

    from corejax import hub
    from families import add_vocabulary, build, convert

    name = f"moe-e{args.experts}k{args.used}-d{args.hidden}-l{args.layers}-f{args.expert_ffn}"
    out = ROOT / "benchmarks" / "out" / name
    gguf = out / f"{name}-{args.outtype}.gguf"
    if gguf.exists():
        return gguf
    (out / "hf").mkdir(parents=True, exist_ok=True)
    smollm2 = hub.resolve("smollm2-135m-instruct", progress=True).path
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        transformers.AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name).save_pretrained(tokenizer)
    vocab = add_vocabulary("qwen3moe", out / "hf", tokenizer)
    heads = args.hidden // 64
    build("qwen3moe", out / "hf", vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
          num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
          num_experts=args.experts, num_experts_per_tok=args.used, moe_intermediate_size=args.expert_ffn,
          intermediate_size=args.expert_ffn * 4, max_position_embeddings=4096)
    convert(out / "hf", gguf, args.outtype)
    for f in (out / "hf").glob("*.safetensors"):  # the float folder is only the converter's input
        f.unlink()
    return gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--used", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--expert-ffn", type=int, default=512)
    ap.add_argument("--outtype", default="q8_0", help="llama.cpp converter's --outtype (q8_0, f16, ...)")
    ap.add_argument("--prompt-lengths", nargs="+", default=["32", "128"])
    ap.add_argument("--decode-tokens", default="32")
    ap.add_argument("--reps", default="3")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "moe.json"))
    args = ap.parse_args()
    gguf = build_gguf(args)
    cmd = [sys.executable, "-c", "import sys; from corejax.cli import main; sys.exit(main())", "bench", "--suite", "generation", "-m", str(gguf),
           "--runtimes", "corejax", "llama.cpp", "--prompt-lengths", *args.prompt_lengths,
           "--decode-tokens", args.decode_tokens, "--reps", args.reps, "--json", args.json]
    print("$", " ".join(cmd), flush=True)
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
