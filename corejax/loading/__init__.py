"""Checkpoint readers (GGUF, safetensors) and the conversion from checkpoint names to corejax params."""
