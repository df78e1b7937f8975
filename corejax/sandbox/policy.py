"""The worker's self-restriction, applied before it reads a byte of the model: a network namespace, rlimits,
dropped capabilities, no_new_privs, Landlock and seccomp, in that order (each later layer would forbid the
syscalls an earlier one needs). Every layer reports whether the kernel let it engage; none is assumed.

Linux only; everything goes through ctypes (libc and libseccomp.so.2), so there is no compiled extension.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from corejax.sandbox.layer import CLONE_NEWNET, CLONE_NEWUSER, Layer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# Syscall numbers that are the same on every architecture (Landlock came after the unified table).
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)


def _err(what: str) -> str:
    e = ctypes.get_errno()
    return f"{what} failed: {errno.errorcode.get(e, e)} ({os.strerror(e)})"


def set_parent_death_signal(sig: int = 9) -> None:
    """The kernel kills the worker when its parent dies, so a crashed parent leaves no orphan behind."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


# --- network namespace --------------------------------------------------------------------------------

def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def new_network_namespace() -> Layer:
    """A private network namespace (only a down loopback): directly as root, else inside a user namespace."""
    _libc.unshare.argtypes = [ctypes.c_int]
    if _libc.unshare(CLONE_NEWNET) == 0:
        return Layer("network_namespace", True, "unshare(CLONE_NEWNET): no interfaces but a down loopback")
    first = _err("unshare(CLONE_NEWNET)")
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return Layer("network_namespace", False,
                     f"{first}; {_err('unshare(CLONE_NEWUSER|CLONE_NEWNET)')} (needs root or unprivileged user "
                     "namespaces: sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces)",
                     available=False)
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError as e:
        return Layer("network_namespace", True, f"in a new user namespace (uid map failed: {e})")
    return Layer("network_namespace", True, "in a new user namespace (unprivileged): no interfaces")


# --- rlimits -------------------------------------------------------------------------------------------

def _user_tasks() -> int:
    """Threads the real user already runs: RLIMIT_NPROC counts them all, not only this process's."""
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return n


def set_rlimits(*, max_file_bytes: int, max_open_files: int, extra_tasks: int) -> Layer:
    """Soft and hard limits alike, so the worker cannot raise them back (seccomp also denies setrlimit)."""
    limits = {
        "core": (resource.RLIMIT_CORE, 0),
        "fsize": (resource.RLIMIT_FSIZE, max_file_bytes),
        "nofile": (resource.RLIMIT_NOFILE, max_open_files),
        "nproc": (resource.RLIMIT_NPROC, _user_tasks() + extra_tasks),
    }
    done, failed = [], []
    for name, (res, value) in limits.items():
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(res, (value, value))
            done.append(f"{name}={value}")
        except (OSError, ValueError) as e:
            failed.append(f"{name}: {e}")
    note = "; root is exempt from nproc" if os.getuid() == 0 else ""
    return Layer("rlimits", not failed, ", ".join(done) + (f"; failed {failed}" if failed else "") + note)


# --- capabilities --------------------------------------------------------------------------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> Layer:
    """Empties the bounding, ambient, effective, permitted and inheritable sets (matters when run as root)."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: the set is then already empty
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if _SYS_CAPSET is None:
        return Layer("capabilities", False, f"capset number unknown on {os.uname().machine}")
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    data = (_CapData * 2)()
    if _libc.syscall(_SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)) != 0:
        return Layer("capabilities", False, _err("capset"))
    eff = _status_field("CapEff")
    return Layer("capabilities", int(eff, 16) == 0, f"CapEff={eff}")


def _status_field(name: str, path: str = "/proc/thread-self/status") -> str:
    for line in Path(path).read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


def set_no_new_privs() -> Layer:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return Layer("no_new_privs", False, _err("prctl(PR_SET_NO_NEW_PRIVS)"))
    return Layer("no_new_privs", True, "setuid binaries and file capabilities give nothing")


# --- Landlock ------------------------------------------------------------------------------------------

_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ALL_V1 = (1 << 13) - 1  # execute ... make_sym
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: Landlock is absent or disabled at boot)."""
    v = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(v), 0)


def landlock(read: Iterable[str | os.PathLike], write: Iterable[str | os.PathLike],
             devices: Iterable[str | os.PathLike] = (), list_only: Iterable[str | os.PathLike] = (),
             bind_ports: Iterable[int] | None = None) -> list[Layer]:
    """Read-only `read`, read-write `write`, read-write + ioctl `devices`, `list_only` folders listed but their
    files unread; nothing else, and no TCP. bind_ports (a process of a cluster, corejax/engine/distributed.py): TCP
    connect is left to seccomp (close_network), and bind is allowed on these ports only (0: an ephemeral one)."""
    abi = landlock_abi()
    if abi == 0:
        return [Layer("landlock", False, "the kernel has no Landlock (needs Linux 5.13+ with lsm=landlock)",
                      available=False),
                Layer("landlock_network", False, "no Landlock", available=False)]
    fs = _FS_ALL_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) | (
        _FS_IOCTL_DEV if abi >= 5 else 0)
    net = (_NET_BIND_TCP | (_NET_CONNECT_TCP if bind_ports is None else 0)) if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    rs = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rs < 0:
        return [Layer("landlock", False, _err("landlock_create_ruleset")), Layer("landlock_network", False, "")]
    read_dir = _FS_READ_FILE | _FS_READ_DIR
    write_dir = fs & ~_FS_EXECUTE & ~_FS_IOCTL_DEV  # everything but exec (and device ioctls) in the private temp
    granted, skipped = [], []
    try:
        for paths, access in ((read, read_dir), (write, write_dir), (devices, _FS_READ_FILE | _FS_WRITE_FILE | (
                _FS_IOCTL_DEV if abi >= 5 else 0)), (list_only, _FS_READ_DIR)):
            for p in dict.fromkeys(str(p) for p in paths):
                try:
                    fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    skipped.append(p)
                    continue
                try:
                    allowed = access if os.path.isdir(p) else access & _FILE_ONLY
                    rule = _PathBeneath(allowed & fs, fd)
                    if _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(rs), ctypes.c_int(_RULE_PATH_BENEATH),
                                     ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                        skipped.append(f"{p} ({_err('add_rule')})")
                    else:
                        granted.append(p)
                finally:
                    os.close(fd)
        for port in (bind_ports or ()) if net else ():
            rule = _NetPort(_NET_BIND_TCP, port)
            if _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(rs), ctypes.c_int(_RULE_NET_PORT),
                             ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                return [Layer("landlock", False, _err("add_rule(net port)")), Layer("landlock_network", False, "")]
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(rs), ctypes.c_uint32(0)) != 0:
            return [Layer("landlock", False, _err("landlock_restrict_self")), Layer("landlock_network", False, "")]
    finally:
        os.close(rs)
    fs_detail = f"ABI {abi}: {len(granted)} paths granted" + (", scoped signals/abstract sockets" if scoped else "")
    net_detail = "TCP bind and connect denied" if bind_ports is None else (
        f"TCP bind only on port(s) {', '.join(map(str, bind_ports)) or 'none'} (0: ephemeral); connect until "
        "the cluster has joined, then none (seccomp)")
    return [Layer("landlock", True, fs_detail),
            Layer("landlock_network", bool(net), net_detail if net else
                  f"Landlock ABI {abi} has no network rules (needs 4)", available=bool(net))]


# --- the whole policy ----------------------------------------------------------------------------------

def python_paths() -> tuple[list[str], list[str]]:
    """What the interpreter and its packages are read from: (folders and files to read, folders only to list).

    The interpreter's prefixes (stdlib, site-packages) are read whole. Other sys.path entries — a source
    checkout in an editable install, PYTHONPATH folders — may only be listed (imports look there), and of
    them only corejax's own packages (corejax/, kernels/) are readable: not the rest of the repository."""
    import importlib.util

    # corejax.kernels is the repository's top-level kernels/ folder (pyproject's package-dir): found, not
    # imported (importing it imports JAX, whose threads would then escape Landlock).
    kernels = importlib.util.find_spec("corejax.kernels")
    prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    real = [os.path.realpath(p) for p in prefixes]
    read = [*prefixes, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # corejax/
    if kernels is not None and kernels.submodule_search_locations:  # a namespace package: no origin
        read.extend(os.path.abspath(p) for p in kernels.submodule_search_locations)
    list_only = []
    for p in sys.path:
        if p and os.path.isabs(p):
            inside = any(os.path.realpath(p) == r or os.path.realpath(p).startswith(r + os.sep) for r in real)
            (read if inside or os.path.isfile(p) else list_only).append(p)
    return read, list_only


# Shared libraries, the loader cache, CPU topology (XLA sizes its thread pools from /proc and /sys). Of /proc
# only the worker's own folder (its threads, maps, status: /proc/self and /proc/thread-self lead there) and
# the machine-wide files the runtime reads: not other processes' command lines, status or descriptors.
SYSTEM_READ = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache", "/etc/localtime",
               "/usr/share/zoneinfo", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/sys/vm/overcommit_memory",
               "/sys/devices/system/cpu", "/sys/fs/cgroup", "/sys/devices/system/node", "/dev/urandom", "/dev/random")


# A process of a cluster resolves the coordinator's host name, and gloo reads its interface's PCI device.
NETWORK_READ = ("/etc/hosts", "/etc/host.conf", "/etc/nsswitch.conf", "/etc/resolv.conf", "/etc/gai.conf",
                "/sys/class/net", "/sys/bus/pci", "/sys/devices")


def own_proc() -> list[str]:
    return [f"/proc/{os.getpid()}"]
DEVICES = ("/dev/null", "/dev/zero")


def gpu_devices() -> list[str]:
    return [f"/dev/{n}" for n in sorted(os.listdir("/dev")) if n.startswith(("nvidia", "dri", "accel"))]


def apply(*, model_paths: Iterable[str], private_dirs: Iterable[str], extra_read: Iterable[str] = (),
          network_namespace: bool = True, max_file_bytes: int = 16 << 30, max_open_files: int = 4096,
          extra_tasks: int = 1024, cluster: Any = None) -> list[Layer]:
    """Restricts the calling process for good. Call while it has one thread (Landlock binds only the caller).

    cluster (a corejax.Cluster): the process is one of several serving a model. It keeps the host's
    network (no namespace: the coordinator and the other processes must be reachable), may bind only the
    coordinator's port (process 0 listens there) or an ephemeral port (the collectives' listener), and may
    make TCP sockets and connections until close_network(), which the worker calls once it has joined
    (corejax/engine/distributed.py: join) and before it opens the model."""
    layers = []
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        layers.append(Layer("single_thread", False, f"{threads} threads existed before the policy"))
    if cluster is not None:
        network_namespace = False
    layers.append(new_network_namespace() if network_namespace else
                  Layer("network_namespace", False, "off (one process of a cluster: it needs the host's network)"
                        if cluster is not None else "off (network_namespace=False)", available=False))
    layers.append(set_rlimits(max_file_bytes=max_file_bytes, max_open_files=max_open_files, extra_tasks=extra_tasks))
    layers.append(drop_capabilities())
    layers.append(set_no_new_privs())
    python_read, python_list = python_paths()
    read = [*python_read, *SYSTEM_READ, *own_proc(), *model_paths, *extra_read,
            *(NETWORK_READ if cluster is not None else ())]
    gpus = gpu_devices()  # listed before Landlock hides /dev
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1 and not any(layer.name == "single_thread" for layer in layers):
        layers.append(Layer("single_thread", False, f"{threads} threads started while the policy was prepared"))
    bind_ports = None if cluster is None else [cluster.port, 0] if cluster.leader else [0]
    layers += landlock(read, private_dirs, [*DEVICES, *gpus], list_only=python_list, bind_ports=bind_ports)
    from corejax.sandbox.seccomp import seccomp  # its own module: the filter is the largest layer

    layers.append(seccomp(any_ioctl=bool(gpus), network=cluster is not None))
    return layers


def close_network() -> Layer:
    """A process of a cluster, once joined: no new socket, connection, bind, listen or accept on any thread
    from now on. It keeps the connections it holds (to the coordinator, and the collectives' to the other
    processes) and can make no other."""
    from corejax.sandbox.seccomp import deny

    return deny("network_closed", ("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4"))

