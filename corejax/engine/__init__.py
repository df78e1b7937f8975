"""The compiled side: the jit sites (programs.py), the sampler, the paged KV cache, tensor-parallel sharding and
multi-host replay."""
