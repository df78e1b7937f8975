"""Tokenizers: byte-level BPE, sentencepiece-style BPE and WordPiece from GGUF metadata or HF files."""

from corejax.tokenizer.base import StreamDecoder, Tokenizer
from corejax.tokenizer.chat import TemplateError, render_chat_template
from corejax.tokenizer.files import tokenizer_from_files
from corejax.tokenizer.gguf import tokenizer_from_gguf_metadata

__all__ = ["StreamDecoder", "TemplateError", "Tokenizer", "render_chat_template", "tokenizer_from_files",
           "tokenizer_from_gguf_metadata"]
