"""Host-side KV page allocator: free list, refcounts, prefix reuse by chained page hashes, LRU eviction.

The device sees only pages, page tables and lengths (corejax/engine/cache.py, corejax/kernels/); everything that
decides which page holds what lives here, in plain Python/numpy, never traced. Modelled on vLLM's
`vllm/v1/core/block_pool.py`:
- page 0 is reserved: it is never handed out and pads every page table;
- a full page is identified by a hash chained over all token ids from the start of the sequence up to its
  end, so two prompts share a page only if they agree on every earlier token too;
- a full page whose refcount drops to 0 keeps its KV and its hash ("cached") until the pool needs it back;
  cached pages are reclaimed least recently released first, and a sequence's tail pages are released
  before its head, so common prefixes survive longest;
- sharing is copy-on-write: full pages are immutable; a partly filled page shared after `fork` is copied
  by whichever sequence appends to it first (`append` returns the copy the device must make).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from corejax.errors import CacheFullError

PADDING_PAGE = 0


@dataclasses.dataclass(frozen=True)
class PageCopy:
    """Copy page `src` into page `dst` (all layers, k and v) before writing the new tokens."""

    src: int
    dst: int


@dataclasses.dataclass
class _Sequence:
    tokens: list[int]  # every token id the sequence's KV covers (prompt, then appended)
    pages: list[int]  # page i holds tokens [i · page_size, (i + 1) · page_size)
    hashes: list[bytes]  # chained hash of each full page offered for reuse (those whose KV is written)
    pending: list[bytes] = dataclasses.field(default_factory=list)  # the prompt's full pages' hashes (allocate)
    written: int | None = None  # leading tokens whose KV is written; None: all of `tokens`


def _chain(prev: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(prev + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


class PageAllocator:
    """Pages 1 .. num_pages - 1 of a pool of `page_size`-token pages, handed to sequences by id.

    Contract with the engine: after `allocate`/`append` the caller applies the returned PageCopy list
    (if any), then writes the KV of the new tokens into the slots `slots()` names before the next
    `allocate` may reuse them (a page's hash is registered as soon as its tokens are declared). A prompt
    prefilled in chunks over several steps declares its KV as it goes (`allocate(..., written=0)`, then
    `mark_written` after each chunk): a page another prompt reuses must hold KV, not a chunk still to come (or
    one that never comes, when the request is cancelled or preempted mid-prompt)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"need num_pages >= 2 (page 0 is reserved) and page_size >= 1: {num_pages=} {page_size=}")
        self.num_pages, self.page_size = num_pages, page_size
        self.refcount = np.zeros(num_pages, np.int32)
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))  # never cached, or evicted
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # refcount 0, LRU first
        self._page_of_hash: dict[bytes, int] = {}
        self._hash_of_page: dict[int, bytes] = {}
        self._seqs: dict[int, _Sequence] = {}

    # --- queries -------------------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        """Pages a new request could get now: free plus cached-but-unreferenced (evictable)."""
        return len(self._free) + len(self._cached)

    def pages(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).pages)

    def num_tokens(self, seq_id: int) -> int:
        return len(self._seq(seq_id).tokens)

    def page_table(self, seq_ids: Sequence[int], pages_per_seq: int) -> np.ndarray:
        """-> int32 [len(seq_ids), pages_per_seq], padded with page 0."""
        table = np.full((len(seq_ids), pages_per_seq), PADDING_PAGE, np.int32)
        for row, seq_id in enumerate(seq_ids):
            pages = self._seq(seq_id).pages
            if len(pages) > pages_per_seq:
                raise ValueError(f"sequence {seq_id} holds {len(pages)} pages > {pages_per_seq=}")
            table[row, : len(pages)] = pages
        return table

    def slots(self, seq_id: int, start: int, end: int) -> np.ndarray:
        """Flat slots page · page_size + offset of the sequence's tokens [start, end) -> int32 [end - start]."""
        seq = self._seq(seq_id)
        idx = np.arange(start, end)
        return (np.asarray(seq.pages, np.int32)[idx // self.page_size] * self.page_size + idx % self.page_size).astype(
            np.int32
        )

    def is_cached(self, page: int) -> bool:
        return page in self._hash_of_page

    # --- lifecycle -----------------------------------------------------------------------------------
    def allocate(self, seq_id: int, prompt: Sequence[int], *, reuse: bool = True, written: int | None = None) -> int:
        """Starts sequence `seq_id` holding `prompt`; returns how many leading tokens reuse cached KV
        (none with reuse=False: the prompt's pages are all fresh, e.g. to measure prefill). written: how many
        leading tokens' KV the caller writes before the next `allocate` (default: all of the prompt); the
        prompt's later pages are offered for reuse by `mark_written` as their KV is written.

        Reuse is whole cached pages only, and stops one token short of the prompt's end so at least one
        token is computed (its logits start generation). Raises CacheFullError, changing nothing, when
        the pages it needs are not available."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already allocated; free it or use a new id")
        prompt = [int(t) for t in prompt]
        ps = self.page_size
        reused: list[int] = []
        hashes: list[bytes] = []
        prev = b""
        for i in range(len(prompt) // ps):
            prev = _chain(prev, prompt[i * ps : (i + 1) * ps])
            hashes.append(prev)
            page = self._page_of_hash.get(prev) if reuse else None
            if page is not None and (i + 1) * ps <= len(prompt) - 1 and len(reused) == i:
                reused.append(page)
        needed = -(-len(prompt) // ps) - len(reused)
        evictable_reused = sum(1 for p in reused if p in self._cached)
        self._check(needed, self.num_available - evictable_reused, what=f"a {len(prompt)}-token prompt")
        for page in reused:
            self._retain(page)
        pages = reused + [self._take() for _ in range(needed)]
        self._seqs[seq_id] = seq = _Sequence(tokens=prompt, pages=pages, hashes=[], pending=hashes)
        self._declare(seq, None if written is None else max(written, len(reused) * ps))
        return len(reused) * ps

    def mark_written(self, seq_id: int, length: int) -> None:
        """The sequence's first `length` tokens now have their KV written (a prefill chunk ran): their full
        pages may be reused by later prompts."""
        self._declare(self._seq(seq_id), length)

    def append(self, seq_id: int, tokens: Sequence[int]) -> list[PageCopy]:
        """Adds tokens (generated ones, or the next prefill chunk) to the sequence, allocating pages.

        Returns the copies the device must make first: at most one, when the sequence's last page is
        partly filled and shared with a fork. Raises CacheFullError, changing nothing, if the pool is out."""
        seq = self._seq(seq_id)
        tokens = [int(t) for t in tokens]
        if not tokens:
            return []
        ps = self.page_size
        n = len(seq.tokens)
        cow = n % ps != 0 and self.refcount[seq.pages[-1]] > 1
        needed = -(-(n + len(tokens)) // ps) - len(seq.pages) + int(cow)
        self._check(needed, self.num_available, what=f"{len(tokens)} more tokens for sequence {seq_id}")
        copies = []
        if cow:
            src, dst = seq.pages[-1], self._take()
            self._release(src)
            seq.pages[-1] = dst
            copies.append(PageCopy(src, dst))
        while len(seq.pages) * ps < n + len(tokens):
            seq.pages.append(self._take())
        seq.tokens.extend(tokens)
        self._declare(seq, None)  # generated tokens: written by the step that feeds them
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """Child shares every page of the parent (refcounts + 1); the shared partial last page, if any, is
        copied on the first append by either (see `append`)."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} is already allocated")
        for page in parent.pages:
            self._retain(page)
        self._seqs[child_id] = _Sequence(list(parent.tokens), list(parent.pages), list(parent.hashes))

    def truncate(self, seq_id: int, length: int) -> None:
        """Keeps the sequence's first `length` tokens (speculative decoding rolls back rejected drafts).

        Pages past the new end go back to the pool; a page that held rejected tokens loses its hash, since
        its KV past `length` is stale and will be overwritten by the next append."""
        seq = self._seq(seq_id)
        if not 0 <= length <= len(seq.tokens):
            raise ValueError(f"cannot truncate sequence {seq_id} of {len(seq.tokens)} tokens to {length}")
        ps = self.page_size
        full = length // ps
        for page, h in zip(seq.pages[full:], seq.hashes[full:]):
            if self._hash_of_page.get(page) == h:
                del self._hash_of_page[page], self._page_of_hash[h]
        keep = -(-length // ps)
        for page in reversed(seq.pages[keep:]):
            self._release(page)
        del seq.pages[keep:], seq.hashes[full:], seq.tokens[length:]

    def free(self, seq_id: int) -> None:
        """Drops the sequence; its pages go back to the pool (full hashed pages stay cached for reuse)."""
        seq = self._seqs.pop(seq_id)
        for page in reversed(seq.pages):  # tail first: it is evicted before the prefix it extends
            self._release(page)

    # --- internals -----------------------------------------------------------------------------------
    def _seq(self, seq_id: int) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"no sequence {seq_id} in the page allocator") from None

    def _check(self, needed: int, available: int, *, what: str) -> None:
        usable = self.num_pages - 1
        if needed > usable:
            raise CacheFullError(
                f"{what} needs {needed} KV pages of {self.page_size} tokens but the pool has only {usable}: "
                "raise the KV cache size (or shorten the prompt)",
                needed=needed,
                available=available,
                total=usable,
            )
        if needed > available:
            raise CacheFullError(
                f"{what} needs {needed} KV pages but only {available} of {usable} are free: wait for running "
                "sequences to finish, or free/preempt one",
                needed=needed,
                available=available,
                total=usable,
            )

    def _take(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._cached.popitem(last=False)  # evict the least recently released cached page
            del self._page_of_hash[self._hash_of_page.pop(page)]
        self.refcount[page] = 1
        return page

    def _retain(self, page: int) -> None:
        self._cached.pop(page, None)
        self.refcount[page] += 1

    def _release(self, page: int) -> None:
        assert self.refcount[page] > 0, f"page {page} released more often than taken"
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            if page in self._hash_of_page:
                self._cached[page] = None
            else:
                self._free.append(page)

    def _declare(self, seq: _Sequence, written: int | None) -> None:
        """Hashes the sequence's newly full pages up to `written` tokens (None: all) and offers them for reuse
        (first page with a hash wins)."""
        seq.written = None if written is None or written >= len(seq.tokens) else written
        ps = self.page_size
        hashes = seq.pending
        for i in range(len(seq.hashes), (len(seq.tokens) if seq.written is None else seq.written) // ps):
            h = (
                hashes[i]
                if i < len(hashes)
                else _chain(seq.hashes[-1] if seq.hashes else b"", seq.tokens[i * ps : (i + 1) * ps])
            )
            seq.hashes.append(h)
            page = seq.pages[i]
            if h not in self._page_of_hash and page not in self._hash_of_page:
                self._page_of_hash[h] = page
                self._hash_of_page[page] = h
