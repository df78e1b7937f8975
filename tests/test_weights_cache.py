"""The repacked-weights cache (corejax/loading/weights_cache.py): written on a first load, mapped on the next with
the same logits and tokens as a load without it, and never trusted when the model file, the cache file or the
folder it lives in is not what it should be."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from corejax.kernels import ffi
from tiny_model import write_tiny_llama

import corejax
from corejax.hub import ModelSource
from corejax.loading import weights_cache
from corejax.loading.loader import load_model
from corejax.types import weights_file
from corejax.types.weights_file import CachePlan

pytestmark = pytest.mark.skipif(not ffi.ensure(), reason="the native kernels (and the kept-quantized path) need a "
                                                         "C++ compiler")


@pytest.fixture
def model(tmp_path: Path) -> ModelSource:
    return ModelSource("tiny", "gguf", write_tiny_llama(tmp_path / "tiny.gguf", context=64, quantize="Q8_0"))


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The weights cache's folder, in the test's own folder (the native kernels stay in the real cache)."""
    folder = tmp_path / "cache" / "weights"
    monkeypatch.setattr(weights_file, "cache_root", lambda: folder)
    monkeypatch.delenv(weights_file.ENV, raising=False)
    return folder


def _logits(m) -> np.ndarray:
    from corejax.engine.programs import full_logits

    ids = jnp.asarray([m.tokenizer.encode("the cat sat on the mat")])
    return np.asarray(full_logits(m.params, ids, cfg=m.cfg))


def _load(source: ModelSource, **kw):
    return load_model(source, weights="native", progress=False, **kw)


def test_first_load_writes_the_cache_and_the_second_maps_it_bit_identically(model, root):
    plain = _load(model, weights_cache=None)
    assert plain.info["weights_cache"]["status"] == "off"
    first = _load(model)
    assert first.info["weights_cache"]["status"] == "written"
    files = weights_file.cache_files(root)
    assert len(files) == 1 and files[0].name.startswith("tiny-")
    second = _load(model)
    assert second.info["weights_cache"] == {"status": "hit", "detail": "", "file": str(files[0])}
    expected = _logits(plain)
    for m in (first, second):  # the first load serves from the file it wrote, too
        np.testing.assert_array_equal(_logits(m), expected)
    # Mapped, not copied: JAX's buffers are the file's pages, read-only.
    codes = second.params["layers"][0]["w_gate"].codes
    assert not np.asarray(codes).flags.writeable


def test_a_runtime_on_a_cached_file_gives_the_same_greedy_tokens_and_counts_mapped_weights(model, root):
    from corejax.worker.start import open_runtime

    sp = corejax.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs, infos = [], []
    for cache in (None, "default", "default"):
        rt = open_runtime(model, weights="native", progress=False, weights_cache=cache)
        outs.append(list(rt.stream("the cat", None, sp))[-1].result.tokens)
        infos.append(rt.info())
    assert outs[0] == outs[1] == outs[2]
    assert [i["weights_cache"]["status"] for i in infos] == ["off", "written", "hit"]
    assert "mapped from the weights cache" in infos[2]["memory"]["reservations"]["weights"]["detail"]
    assert "mapped" not in infos[1]["memory"]["reservations"]["weights"]["detail"]
    assert {"rss_anon", "rss_file"} <= set(infos[2]["resident"])


def test_a_changed_model_file_gets_a_new_cache_and_the_old_one_is_dropped(model, root):
    _load(model)
    (old,) = weights_file.cache_files(root)
    st = model.path.stat()
    os.utime(model.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: a new identity
    again = _load(model)
    assert again.info["weights_cache"]["status"] == "written"
    (new,) = weights_file.cache_files(root)
    assert new != old
    # A file whose header names another identity is refused even under the right name: the file as it was.
    os.replace(new, old)
    os.utime(model.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    params, why = weights_cache.load(old, model.path, ffi.library_key())
    assert params is None and "another file" in why
    assert not old.exists()


@pytest.mark.parametrize("damage", ["truncate", "header", "buffer", "empty", "garbage"])
def test_a_damaged_cache_file_is_rebuilt_never_used(model, root, damage):
    expected = _logits(_load(model, weights_cache=None))
    _load(model)
    (path,) = weights_file.cache_files(root)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header":
        data[weights_file.PREFIX_BYTES + 10] ^= 0x55
    elif damage == "buffer":  # the first data page: each buffer's first and last 4 KiB are checksummed
        start = weights_file.PREFIX.unpack_from(bytes(data), 0)[4]
        data[start + 3] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(os.urandom(len(data)))
    path.write_bytes(bytes(data))
    m = _load(model)
    cache = m.info["weights_cache"]
    assert cache["status"] == "written" and cache["detail"].startswith("unusable"), cache
    np.testing.assert_array_equal(_logits(m), expected)
    assert _load(model).info["weights_cache"]["status"] == "hit"


def test_mapped_params_that_do_not_fit_the_model_are_rejected(model, root):
    from corejax.loading.loader import cache_plan

    _load(model)
    plan = cache_plan(model)
    params, status = weights_cache.load_or_build(plan, model.path, lambda: "built", check=lambda p: "no good")
    assert params == "built" and status["status"] == "not written" and "no good" in status["detail"]
    assert not plan.read.exists()


def test_a_hit_reports_the_loading_stage_to_the_progress_callback(model, root):
    seen = []
    _load(model)
    load_model(model, weights="native", progress=lambda *a: seen.append(a))
    assert seen and seen[-1][0] == "loading weights" and seen[-1][1] == seen[-1][2] > 0


def test_the_switch_turns_it_off(model, root, monkeypatch):
    monkeypatch.setenv(weights_file.ENV, "0")
    m = _load(model)
    assert m.info["weights_cache"]["status"] == "off"
    assert not root.exists()


def test_an_unwritable_folder_or_a_full_disk_falls_back_to_the_repacked_weights(model, tmp_path, monkeypatch):
    expected = _logits(_load(model, weights_cache=None))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a path under a regular file cannot be made (root ignores read-only permissions)
    m = _load(model, weights_cache=CachePlan(blocker / "x.cjw", blocker / "x.cjw"))
    assert m.info["weights_cache"]["status"] == "not written", m.info["weights_cache"]
    np.testing.assert_array_equal(_logits(m), expected)
    m = _load(model, weights_cache=CachePlan(tmp_path / "ro.cjw", None))  # a sandboxed worker's read-only cache
    assert m.info["weights_cache"]["status"] == "not written"

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(weights_cache.os, "statvfs", lambda path: Full())
    m = _load(model, weights_cache=CachePlan(tmp_path / "full.cjw", tmp_path / "full.cjw"))
    assert m.info["weights_cache"]["status"] == "not written" and "free" in m.info["weights_cache"]["detail"]
    assert not list(tmp_path.glob("*full.cjw*"))
    np.testing.assert_array_equal(_logits(m), expected)


def test_models_of_one_name_in_two_folders_keep_a_cache_each(model, root, tmp_path):
    (tmp_path / "b").mkdir()
    twin = ModelSource("tiny", "gguf", write_tiny_llama(tmp_path / "b" / "tiny.gguf", context=64, quantize="Q8_0",
                                                        seed=1))
    _load(model)
    _load(twin)
    assert len(weights_file.cache_files(root)) == 2
    assert _load(model).info["weights_cache"]["status"] == _load(twin).info["weights_cache"]["status"] == "hit"


def test_orphaned_cache_files_are_pruned(model, root, tmp_path):
    other = ModelSource("gone", "gguf", write_tiny_llama(tmp_path / "gone.gguf", context=64, quantize="Q8_0"))
    _load(other)
    other.path.unlink()
    _load(model)
    assert [p.name.split("-")[0] for p in weights_file.cache_files(root)] == ["tiny"]


def test_a_sandboxed_worker_writes_through_its_stage_and_the_next_one_maps_the_file(model, root):
    outs, statuses = [], []
    for _ in range(2):
        with corejax.Session(str(model.path), weights="native", progress=False) as s:
            statuses.append(s.info()["weights_cache"]["status"])
            outs.append(s.generate("the cat", max_tokens=8, temperature=0, ignore_eos=True).tokens)
    assert statuses == ["written", "hit"]
    assert outs[0] == outs[1]
    assert len(weights_file.cache_files(root)) == 1
    assert not [p for p in root.iterdir() if p.name.startswith(".stage-")]  # the staging folders are gone
