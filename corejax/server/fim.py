"""Fill-in-the-middle for /v1/completions' suffix: the prompt becomes the model's FIM prefix-suffix-middle form.

A model can fill in the middle when its vocabulary has the three FIM control tokens of one family: StarCoder's
`<fim_prefix>` `<fim_suffix>` `<fim_middle>`, Qwen2.5-Coder's `<|fim_prefix|>` ..., CodeLlama's `<PRE>` `<SUF>`
`<MID>`. Each family is trained on the PSM order, prefix-suffix-middle, which llama.cpp's /infill also uses:

    <fim_prefix>{prompt}<fim_suffix>{suffix}<fim_middle>   -> the model writes the middle

Found by tokenizing each spelling in the worker (a control token in the text is one id); when the GGUF names its
FIM tokens (tokenizer.ggml.fim_pre_token_id, fim_suf_token_id, fim_mid_token_id) the ids found must be those.
SmolLM2 has StarCoder's other control tokens (<repo_name>, <file_sep>, ...) but no FIM ones: it gets the 400."""

from __future__ import annotations

import asyncio
from typing import Any

from corejax import errors
from corejax.server.schema import ApiError

FAMILIES = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),        # StarCoder, SantaCoder, Granite code
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma-style
    ("<PRE>", "<SUF>", "<MID>"),                             # CodeLlama
)
_METADATA = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id")


def _find(model: Any) -> tuple[str, str, str] | None:
    """The model's FIM spellings, or None (blocking: it asks the worker)."""
    metadata = model.info.get("metadata") or {}
    named = tuple(metadata.get(k) for k in _METADATA)
    for family in FAMILIES:
        ids = [model.session.tokenize(t, add_special=False) for t in family]
        single = all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 3
        if single and (all(n is None for n in named) or tuple(i[0] for i in ids) == named):
            return family
    return None


async def fim_prompts(model: Any, prompts: list[str], suffix: str) -> list[str]:
    """Each prompt in the model's FIM form with the suffix; a model without FIM tokens: a 400 naming it."""
    if not hasattr(model, "fim_tokens"):  # found once per loaded model
        try:
            model.fim_tokens = await asyncio.to_thread(_find, model)
        except errors.CorejaxError as e:
            raise ApiError(503, f"{model.id}: could not read its vocabulary ({e})", type="server_error") from None
    if model.fim_tokens is None:
        raise ApiError(400, f"{model.id} has no fill-in-the-middle tokens (none of "
                            f"{', '.join(f[0] for f in FAMILIES)} ... in its vocabulary), so suffix cannot be "
                            "used with it; use a code model with FIM tokens, or drop suffix", param="suffix",
                       code="fim_not_supported")
    pre, suf, mid = model.fim_tokens
    return [f"{pre}{p}{suf}{suffix}{mid}" for p in prompts]
