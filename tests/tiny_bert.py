"""Randomly initialised tiny BERT checkpoints written with transformers' save_pretrained (safetensors), with a
WordPiece tokenizer.json, for the encoder tests."""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "movie", "was", "great", "terrible", "fine", "good", "bad", "awful", "wonderful", "boring", "film", "plot", "actor", "very", "not", "and", "a", "an", "is", "it", "i", "love", "hate", "this", "that", "ok", "so", "really", "café", "naïve", "東", "京"]


def write_tiny_bert(folder: Path, *, head: str | None = None, num_labels: int = 3, seed: int = 0) -> Path:
    """head: None (BertModel), "single" (softmax over num_labels) or "multi" (multi-label, sigmoid)."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        BertTokenizerFast,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
             *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    kw = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64)
    if head is not None:
        kw.update(num_labels=num_labels, id2label={i: f"label_{chr(97 + i)}" for i in range(num_labels)},
                  label2id={f"label_{chr(97 + i)}": i for i in range(num_labels)})
        if head == "multi":
            kw["problem_type"] = "multi_label_classification"
    torch.manual_seed(seed)
    cfg = BertConfig(**kw)
    model = (BertModel(cfg) if head is None else BertForSequenceClassification(cfg)).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder
