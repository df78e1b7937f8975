"""How many prompt tokens one scheduler step prefills while other sequences decode (`PrefillPacer`).

A step runs one prefill call and then one decode call, so every running stream waits for the step's prefill
part before its next token. The part is sized in time, not tokens: the largest power-of-two token budget whose
measured prefill time stays within `EngineConfig.max_prefill_stall` (1 s by default), at least
`INTERLEAVE_FLOOR` tokens (a prompt always progresses) and at most the engine's prefill_chunk; with nothing
decoding, a step takes a whole chunk. One setting then suits a 135M model (whole 512-token chunks, ~0.55 s on
two idle cores) and a 1.1B one (~10 ms per prompt token: 64-token parts), where a fixed token count would
either freeze the 1.1B model's streams for seconds or slice the small model's prompts needlessly fine.

Why the default stall is not kept near a decode step (Sarathi-Serve's "stall-free batching"): there the prompt
tokens ride in the decode's own forward on a GPU, whose decode step leaves compute idle. Here they are a call of
their own on the CPU cores the decode also needs: a prompt token costs ~1 ms however it is sliced, and a small
call still costs about a decode step (SmolLM2, 2 busy cores: 16 tokens 39 ms, 32 tokens 46 ms, 64 tokens 92 ms,
128 tokens 208 ms, a decode step of 8 rows 35 ms). Sliced finely, a burst's prompts add that stall to nearly
every gap of every running stream (and the fixed part to the prompts' TTFT); in a few whole chunks they stall
each stream a few times, which keeps the inter-token P95 near the plain decode step (benchmarks/pacing_model.py;
the figures are in docs/MEASUREMENTS.md, serving section). A deployment that wants smooth streams over throughput sets a small max_prefill_stall
(0.05 s: `INTERLEAVE_FLOOR`-token parts).

Timing comes from the prefill calls that sample (they wait for their result anyway, so nothing is synchronised
for the measurement); each shape's first call, which compiles, is not a measurement. Sizes not timed yet are
estimated from the nearest timed one, linearly in tokens; with none timed, a step takes the floor.
"""

from __future__ import annotations

INTERLEAVE_FLOOR = 32  # below this a call is mostly its fixed cost (the 16-token figure above)


class PrefillPacer:
    """The prefill token budget of each step; `timed()` feeds it each sampled prefill call's duration.

    chunk: the engine's prefill_chunk (a step's most prompt tokens); max_stall: seconds a step's prefill part
    may delay the running streams; floor: the fewest prompt tokens a step prefills while others decode."""

    def __init__(self, chunk: int, max_stall: float, floor: int = INTERLEAVE_FLOOR):
        if not max_stall > 0:
            raise ValueError(f"max_stall must be a positive number of seconds; got {max_stall!r}")
        self.chunk, self.max_stall, self.floor = chunk, max_stall, min(floor, chunk)
        self.seconds: dict[int, float] = {}  # padded tokens of a call (B * T) -> its time, exponentially averaged
        self._seen: set[tuple[int, int]] = set()

    def budget(self, decoding: bool) -> int:
        """Prompt tokens this step may prefill (`batch.prefill_parts`' budget)."""
        if not decoding:
            return self.chunk
        if not self.seconds:
            return self.floor
        n = 1 << (self.chunk.bit_length() - 1)
        while n > self.floor and self.estimate(n) > self.max_stall:
            n //= 2
        return max(n, self.floor)

    def estimate(self, tokens: int) -> float | None:
        """Seconds a call over `tokens` padded tokens takes: the nearest timed size (in log2) scaled linearly,
        or None before any call was timed."""
        if not self.seconds:
            return None
        near = min(self.seconds, key=lambda m: (abs(m.bit_length() - tokens.bit_length()), -m))
        return self.seconds[near] * tokens / near

    def timed(self, shape: tuple[int, int], seconds: float) -> None:
        """A prefill call of shape (B, T) took `seconds`, from its dispatch to its sampled tokens on the host."""
        if shape in self._seen:
            tokens = shape[0] * shape[1]
            old = self.seconds.get(tokens)
            self.seconds[tokens] = seconds if old is None else 0.7 * old + 0.3 * seconds
        self._seen.add(shape)
