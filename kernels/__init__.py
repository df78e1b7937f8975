"""Attention and matmul kernels, shipped as ``corejax.kernels``: one op per file."""

from corejax.kernels.flash_attention import flash_attention, flash_attention_reference
from corejax.kernels.kv_quant import KV_FORMATS, dequantize_kv, kv_format, quantize_kv
from corejax.kernels.paged_attention import (
    gather_pages,
    paged_attention,
    paged_attention_reference,
)

__all__ = [
    "KV_FORMATS",
    "dequantize_kv",
    "flash_attention",
    "flash_attention_reference",
    "gather_pages",
    "kv_format",
    "paged_attention",
    "paged_attention_reference",
    "quantize_kv",
]
