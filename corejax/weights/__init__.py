"""Weight containers the matmuls understand: quantized arrays and their one matmul."""
