"""Serving one model in the worker: the scheduler (continuous batching), its requests, step batches, the page
allocator, structured-output masks, speculative decoding, the model runner that calls the compiled programs."""
