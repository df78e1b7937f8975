"""Escape attempts made from inside a sandboxed worker (through corejax.sandbox.testing), each one denied.

The probes below run in the worker: this module is imported there by name. Each returns "ALLOWED" when the
attempt worked, else the errno it failed with; a probe killed by SIGSYS would surface as WorkerCrashed."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import uuid
from pathlib import Path

import pytest

DENIED = {errno.EPERM, errno.EACCES, errno.ENETUNREACH, errno.ENOSYS}


def _attempt(fn) -> object:
    try:
        fn()
    except OSError as e:
        return e.errno
    return "ALLOWED"


# --- probes (run inside the worker) ---------------------------------------------------------------------

def probe_tcp(port):
    def go():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
    return _attempt(go)


def probe_udp(port):
    return _attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", port)))


def probe_unix_socket():
    return _attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))


def probe_read(path):
    return _attempt(lambda: Path(path).read_bytes())


def probe_write(path):
    return _attempt(lambda: Path(path).write_bytes(b"escaped"))


def probe_write_private_temp():
    path = Path(os.environ["TMPDIR"]) / "ok.txt"
    path.write_text("fine")
    return path.read_text()


def probe_exec():
    return _attempt(lambda: os.execv("/bin/sh", ["/bin/sh", "-c", "true"]))


def probe_fork_exec():
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/bin/sh", ["/bin/sh", "-c", "exit 0"])
        except OSError as e:
            os._exit(e.errno)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "ALLOWED" if code == 0 else code


def probe_ptrace_parent():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, os.getppid(), None, None) == 0:  # PTRACE_ATTACH
        return "ALLOWED"
    return ctypes.get_errno()


def probe_parent_mem():
    def go():
        with open(f"/proc/{os.getppid()}/mem", "r+b", buffering=0) as f:
            f.seek(0x400000)
            f.write(b"\0")
    return _attempt(go)


def probe_raise_rlimit():
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1, hard + 1))
    except (OSError, ValueError) as e:
        return getattr(e, "errno", errno.EPERM) or errno.EPERM
    return "ALLOWED"


def probe_unshare(flags):
    libc = ctypes.CDLL(None, use_errno=True)
    return "ALLOWED" if libc.unshare(flags) == 0 else ctypes.get_errno()


def probe_kill_parent():
    return _attempt(lambda: os.kill(os.getppid(), 0))


def probe_environment():
    return {"env": sorted(os.environ), "cwd": os.getcwd(), "cwd_entries": os.listdir(".")}


def probe_network_interfaces():
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]  # this process's network namespace
    return sorted(line.split(":")[0].strip() for line in lines)


# --- tests (run in the parent) --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox():
    from corejax.sandbox.testing import TestingSession

    with TestingSession(pythonpath=[str(Path(__file__).parent)], timeout=60) as session:
        yield session


def run(sandbox, name, *args):
    return sandbox.run(f"{__name__}:{name}", *args)


def test_tcp_and_udp_to_a_loopback_listener_are_denied(sandbox):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        assert run(sandbox, "probe_tcp", tcp.getsockname()[1]) in DENIED
        assert run(sandbox, "probe_udp", udp.getsockname()[1]) in DENIED
        tcp.settimeout(0.2)
        with pytest.raises(socket.timeout):
            tcp.accept()
    finally:
        tcp.close()
        udp.close()
    assert run(sandbox, "probe_unix_socket") in DENIED


def test_no_network_interfaces_but_loopback(sandbox):
    assert run(sandbox, "probe_network_interfaces") in (["lo"], [])


def test_a_secret_in_the_home_folder_cannot_be_read(sandbox):
    secret = Path.home() / f".corejax-test-secret-{uuid.uuid4().hex}"
    secret.write_text("hunter2")
    try:
        assert run(sandbox, "probe_read", str(secret)) in DENIED
        assert run(sandbox, "probe_read", "/etc/shadow") in DENIED | {errno.ENOENT}
    finally:
        secret.unlink()


def test_writes_land_only_in_the_private_temp(sandbox, tmp_path):
    assert run(sandbox, "probe_write_private_temp") == "fine"
    for target in (tmp_path / "escape.txt", Path.home() / f".corejax-escape-{uuid.uuid4().hex}",
                   Path("/tmp") / f"corejax-escape-{uuid.uuid4().hex}", Path(__file__)):
        before = target.read_bytes() if target.exists() else None
        assert run(sandbox, "probe_write", str(target)) in DENIED
        assert (target.read_bytes() if target.exists() else None) == before


def test_exec_is_denied(sandbox):
    assert run(sandbox, "probe_exec") in DENIED


def test_fork_then_exec_is_denied(sandbox):
    assert run(sandbox, "probe_fork_exec") in DENIED


def test_the_parent_cannot_be_traced_written_or_signalled(sandbox):
    assert run(sandbox, "probe_ptrace_parent") in DENIED
    assert run(sandbox, "probe_parent_mem") in DENIED
    assert run(sandbox, "probe_kill_parent") in DENIED


def test_rlimits_cannot_be_raised(sandbox):
    assert run(sandbox, "probe_raise_rlimit") in DENIED


@pytest.mark.parametrize("flags", [0x10000000, 0x40000000, 0x10000000 | 0x40000000, 0x00020000])
def test_no_new_namespaces(sandbox, flags):
    assert run(sandbox, "probe_unshare", flags) in DENIED


def test_environment_is_scrubbed_and_cwd_empty(sandbox, monkeypatch):
    got = run(sandbox, "probe_environment")
    assert set(got["env"]) <= {"HOME", "TMPDIR", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "OPENBLAS_NUM_THREADS",
                               "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "LANG",
                               "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH"} | {
        k for k in got["env"] if k.startswith(("JAX_", "XLA_", "TF_CPP_", "CUDA_", "NVIDIA_", "TPU_"))}
    assert got["cwd_entries"] == []


def test_every_thread_has_no_new_privs_and_a_seccomp_filter(sandbox):
    report = sandbox.sandbox_report()
    assert all(layer["engaged"] for layer in report["layers"]), report["layers"]
    for tid in os.listdir(f"/proc/{report['pid']}/task"):
        status = Path(f"/proc/{report['pid']}/task/{tid}/status").read_text()
        assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
