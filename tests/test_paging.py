"""The host page allocator: hand-worked page tables, then invariants under random operation sequences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corejax.errors import CacheFullError, MemoryBudgetError
from corejax.serving.paging import PageAllocator, PageCopy


def test_allocate_append_free_table():
    a = PageAllocator(num_pages=8, page_size=4)  # usable pages 1..7
    assert a.allocate("A", range(6)) == 0  # 6 tokens -> 2 pages
    assert a.pages("A") == [1, 2]
    assert a.allocate("B", range(100, 103)) == 0
    assert a.pages("B") == [3]
    assert a.append("A", [6, 7]) == []  # fills page 2 exactly
    assert a.pages("A") == [1, 2]
    assert a.append("A", [8]) == []
    assert a.pages("A") == [1, 2, 4]
    assert a.num_tokens("A") == 9
    np.testing.assert_array_equal(a.page_table(["A", "B"], 4), [[1, 2, 4, 0], [3, 0, 0, 0]])
    np.testing.assert_array_equal(a.slots("A", 3, 9), [7, 8, 9, 10, 11, 16])
    a.free("B")  # B's page is partial, never hashed: straight back to the free list
    assert a.refcount[3] == 0 and not a.is_cached(3)
    assert a.allocate("C", range(200, 209)) == 0
    assert a.pages("C") == [5, 6, 7]
    assert a.num_available == 1  # page 3


def test_prefix_reuse_and_eviction_table():
    a = PageAllocator(num_pages=6, page_size=4)  # usable 1..5
    prompt = list(range(10))  # pages: [0-3] [4-7] [8-9]
    assert a.allocate("A", prompt) == 0
    assert a.pages("A") == [1, 2, 3]
    # same 8-token prefix, different tail: shares both full pages while A is still running
    assert a.allocate("B", prompt[:8] + [99, 98, 97]) == 8
    assert a.pages("B") == [1, 2, 4]
    assert list(a.refcount[1:6]) == [2, 2, 1, 1, 0]
    # a prompt that is exactly the two cached pages reuses only the first: one token must be computed
    assert a.allocate("C", prompt[:8]) == 4
    assert a.pages("C") == [1, 5]
    # a different first page breaks the chain even if the second page's tokens match
    with pytest.raises(CacheFullError, match="only 0 of 5 are free"):
        a.allocate("D", [7, 7, 7, 7] + prompt[4:8] + [1])
    a.free("C")
    a.free("B")
    a.free("A")  # A's tail page 3 is partial -> free list; its full pages 1, 2 stay cached
    assert list(a.refcount[1:6]) == [0, 0, 0, 0, 0]
    assert a.is_cached(1) and a.is_cached(2) and not a.is_cached(3)
    # a new request with the prefix finds the cached pages after everyone left
    assert a.allocate("E", prompt[:8] + [5]) == 8
    assert a.pages("E") == [1, 2, 5]  # page 5 (C's partial page, freed first) is at the free-list head
    # now the pool holds 3 free pages and no unreferenced cached ones; exhaust it, then evict by LRU
    a.free("E")  # releases 5 (free), then 2, then 1 (cached; LRU order: 2 before 1)
    assert a.allocate("F", range(500, 516)) == 0  # 4 pages: free 4, 3, 5, then evicts page 2
    assert a.pages("F") == [4, 3, 5, 2]
    assert a.is_cached(1)  # page 2 now caches F's last page, not the prompt's second page
    # the prefix lost its second page, kept its first: a prompt with the same 8 tokens reuses 4
    a.free("F")  # releases 2, 5, 3, 4 (all full: cached), so the LRU order is 1, 2, 5, 3, 4
    assert a.allocate("G", prompt[:8] + [42]) == 4
    assert a.pages("G") == [1, 2, 5]  # retains 1, then evicts the two least recently released
    assert not a.is_cached(5) and a.is_cached(2)  # page 2 re-registered for G's second page


def test_fork_copy_on_write_table():
    a = PageAllocator(num_pages=8, page_size=4)
    a.allocate("P", range(6))  # pages [1, 2], page 2 half full
    a.fork("P", "C")
    assert a.pages("C") == [1, 2] and list(a.refcount[1:3]) == [2, 2]
    # the first append to the shared partial page copies it, for whoever writes first
    assert a.append("C", [60]) == [PageCopy(src=2, dst=3)]
    assert a.pages("C") == [1, 3] and a.pages("P") == [1, 2]
    assert list(a.refcount[1:4]) == [2, 1, 1]
    assert a.append("P", [61]) == []  # P now owns page 2 alone
    # forking at a page boundary shares only full pages: nothing to copy
    a.append("P", [62])  # P: 8 tokens, pages [1, 2] full
    a.fork("P", "D")
    assert a.append("D", [63]) == [] and a.pages("D") == [1, 2, 4]
    a.free("P")
    a.free("C")
    a.free("D")
    assert (a.refcount == 0).all() and a.num_available == 7


def test_errors():
    a = PageAllocator(num_pages=4, page_size=2)
    with pytest.raises(CacheFullError, match="pool has only 3") as err:
        a.allocate("big", range(7))
    assert isinstance(err.value, MemoryBudgetError) and err.value.needed == 4
    a.allocate("A", range(5))
    with pytest.raises(CacheFullError, match="wait"):
        a.append("A", range(2))
    assert a.num_tokens("A") == 5 and a.pages("A") == [1, 2, 3]  # unchanged by the failed append
    with pytest.raises(ValueError, match="already"):
        a.allocate("A", [1])
    with pytest.raises(KeyError):
        a.free("nope")
    with pytest.raises(ValueError):
        PageAllocator(1, 16)


# --- property test --------------------------------------------------------------------------------

_ops = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "append", "fork", "free"]),
        st.integers(0, 5),  # which sequence
        st.lists(st.integers(0, 2), min_size=0, max_size=9),  # tokens from a tiny vocabulary: many shared prefixes
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(2, 12))
def test_invariants(ops, page_size, num_pages):
    a = PageAllocator(num_pages, page_size)
    live: dict[int, list[int]] = {}  # seq -> its tokens, tracked independently
    next_id = 100
    for op, which, tokens in ops:
        ids = sorted(live)
        try:
            if op == "allocate" and tokens:
                a.allocate(next_id, tokens)
                live[next_id] = list(tokens)
                next_id += 1
            elif op == "append" and ids:
                seq = ids[which % len(ids)]
                copies = a.append(seq, tokens)
                assert len(copies) <= 1 and all(a.refcount[c.src] >= 1 and a.refcount[c.dst] == 1 for c in copies)
                live[seq] += tokens
            elif op == "fork" and ids:
                a.fork(ids[which % len(ids)], next_id)
                live[next_id] = list(live[ids[which % len(ids)]])
                next_id += 1
            elif op == "free" and ids:
                seq = ids[which % len(ids)]
                a.free(seq)
                del live[seq]
        except CacheFullError:
            pass
        _check(a, live, page_size)
    for seq in list(live):
        a.free(seq)
    assert (a.refcount == 0).all()
    assert a.num_available == num_pages - 1  # every page came back


def _check(a: PageAllocator, live: dict[int, list[int]], ps: int) -> None:
    assert (a.refcount >= 0).all() and a.refcount[0] == 0  # page 0 is never handed out
    holders: dict[int, list[tuple[int, int]]] = {}
    for seq, tokens in live.items():
        pages = a.pages(seq)
        assert a.num_tokens(seq) == len(tokens) and len(pages) == -(-len(tokens) // ps)
        for i, page in enumerate(pages):
            holders.setdefault(page, []).append((seq, i))
    for page in range(1, a.num_pages):
        assert a.refcount[page] == len(holders.get(page, []))  # no page referenced after its last free
    for page, users in holders.items():
        # a shared page holds the same tokens, at the same index, for every sequence that uses it:
        # sequences that diverged inside a page never share it
        (s0, i0), *rest = users
        first = live[s0][i0 * ps : (i0 + 1) * ps]
        for s, i in rest:
            assert i == i0 and live[s][i * ps : (i + 1) * ps] == first, (page, users)


def test_a_chunked_prompt_offers_its_pages_only_as_they_are_written():
    """allocate(..., written=0) then mark_written: another prompt reuses only pages whose KV is written, so a
    prompt cancelled between chunks never hands on pages it did not fill."""
    a = PageAllocator(num_pages=16, page_size=4)
    prompt = list(range(1, 14))  # 13 tokens: 3 full pages
    assert a.allocate(1, prompt, written=0) == 0
    assert a.allocate(2, prompt, written=0) == 0  # nothing written yet: nothing to reuse
    a.free(2)  # cancelled before its first chunk
    a.mark_written(1, 9)  # the first chunk: pages 0 and 1 full and written
    assert a.allocate(3, prompt, written=0) == 8  # the written pages are reused
    a.free(3)
    a.free(1)  # cancelled: page 2 was never written and is not offered
    assert a.allocate(4, prompt + [99]) == 8
    a.free(4)
