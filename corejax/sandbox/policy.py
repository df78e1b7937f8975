"""The worker's self-restriction, applied before it reads a byte of the model: a network namespace, rlimits,
dropped capabilities, no_new_privs, Landlock and seccomp, in that order (each later layer would forbid the
syscalls an earlier one needs). Every layer reports whether the kernel let it engage; none is assumed.

Linux only; everything goes through ctypes (libc and libseccomp.so.2), so there is no compiled extension.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME = 0x10000000, 0x20000000, 0x40000000, 0x00000080
NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                   CLONE_NEWNET, CLONE_NEWTIME)

# Syscall numbers that are the same on every architecture (Landlock came after the unified table).
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of the policy. available: whether this kernel and system offer it at all; a layer that is
    available but did not engage makes the Session refuse to run (client.required_layers_missing)."""

    name: str
    engaged: bool
    detail: str
    available: bool = True

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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
_RULE_PATH_BENEATH = 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: Landlock is absent or disabled at boot)."""
    v = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(v), 0)


def landlock(read: Iterable[str | os.PathLike], write: Iterable[str | os.PathLike],
             devices: Iterable[str | os.PathLike] = (), list_only: Iterable[str | os.PathLike] = ()) -> list[Layer]:
    """Read-only `read`, read-write `write`, read-write + ioctl `devices`, `list_only` folders listed but their
    files unread; nothing else, and no TCP."""
    abi = landlock_abi()
    if abi == 0:
        return [Layer("landlock", False, "the kernel has no Landlock (needs Linux 5.13+ with lsm=landlock)",
                      available=False),
                Layer("landlock_network", False, "no Landlock", available=False)]
    fs = _FS_ALL_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) | (
        _FS_IOCTL_DEV if abi >= 5 else 0)
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
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
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(rs), ctypes.c_uint32(0)) != 0:
            return [Layer("landlock", False, _err("landlock_restrict_self")), Layer("landlock_network", False, "")]
    finally:
        os.close(rs)
    fs_detail = f"ABI {abi}: {len(granted)} paths granted" + (", scoped signals/abstract sockets" if scoped else "")
    return [Layer("landlock", True, fs_detail),
            Layer("landlock_network", bool(net), "TCP bind and connect denied" if net else
                  f"Landlock ABI {abi} has no network rules (needs 4)", available=bool(net))]


# --- seccomp -------------------------------------------------------------------------------------------

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_FLTATR_CTL_TSYNC, _SCMP_FLTATR_CTL_OPTIMIZE = 4, 8
_SCMP_CMP_NE, _SCMP_CMP_MASKED_EQ = 1, 7


def _scmp_errno(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


# Denied with EPERM: running programs, inspecting or writing other processes, changing namespaces, mounts,
# keys, kernel modules, BPF, perf, io_uring (its operations bypass seccomp), and making sockets: the worker
# talks only over the socketpair it inherited.
DENIED = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
    "kcmp", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "unshare", "setns", "keyctl", "add_key", "request_key", "bpf",
    "perf_event_open", "socket", "socketpair", "setrlimit", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm", "quotactl", "quotactl_fd", "lookup_dcookie",
    "fanotify_init", "syslog", "vhangup", "uselib",
    # No child processes (the worker needs none: JAX's threads are clone(CLONE_THREAD)): nothing can outlive
    # the worker or hold memory outside its own. No memory the budget cannot see (memfd is not in RSS).
    "fork", "vfork", "memfd_create", "memfd_secret",
    # Unneeded, and each a way to probe or reshape the system: mount listings, LDT segments, personas,
    # sessions, signals by pidfd or by bare thread id (any thread of the user), other processes' pages.
    "listmount", "statmount", "modify_ldt", "personality", "setsid", "pidfd_open", "pidfd_send_signal", "tkill",
    "migrate_pages", "move_pages", "process_mrelease",
)
# Calls numbered after the architectures' tables were unified (Linux 5.1+: 424 and up, the same everywhere),
# which an older libseccomp cannot name.
_UNIFIED = {"pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
            "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
            "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
            "quotactl_fd": 443, "memfd_secret": 447, "process_mrelease": 448, "statmount": 457, "listmount": 458}
# Scheduling and priority calls take a pid (0: the caller): only the worker's own threads may be changed, by 0.
_SELF_ONLY = (("setpriority", 1), ("ioprio_set", 1), ("sched_setaffinity", 0), ("sched_setscheduler", 0),
              ("sched_setparam", 0), ("sched_setattr", 0))
# Signals only to the worker's own process (before Linux 6.12 Landlock cannot scope them: kill(-1) would reach
# every process of the user).
_OWN_PID = (("kill", 0), ("tgkill", 0), ("rt_sigqueueinfo", 0), ("rt_tgsigqueueinfo", 0))
CLONE_THREAD = 0x00010000


def _libseccomp() -> ctypes.CDLL | None:
    for name in ("libseccomp.so.2", ctypes.util.find_library("seccomp")):
        if name:
            try:
                return ctypes.CDLL(name, use_errno=True)
            except OSError:
                pass
    return None


# The allow-list: what the worker (Python, JAX/XLA, the native kernels, the protocol on its inherited socket)
# calls once its policy is applied, measured by running the test suite's sandboxed workloads under a logging
# filter (COREJAX_SECCOMP_LOG=1: every call outside this list is allowed and logged to the kernel log, see
# docs/SANDBOX.md), widened by the variants other libc and kernel versions use for the same operations (the
# stat, open, poll and sleep families). Anything else fails with ENOSYS, which libraries treat as "not on this
# kernel". Names one architecture lacks (open, stat, poll on aarch64) are skipped there.
ALLOWED = (
    # files (Landlock decides which)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "open", "openat", "openat2", "creat", "close", "close_range", "lseek", "dup", "dup2", "dup3", "fcntl",
    "flock", "fsync", "fdatasync", "ftruncate", "fallocate", "fadvise64", "readahead", "sendfile",
    "copy_file_range", "stat", "lstat", "fstat", "newfstatat", "statx", "statfs", "fstatfs", "access",
    "faccessat", "faccessat2", "readlink", "readlinkat", "getdents", "getdents64", "getcwd", "chdir", "fchdir",
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat",
    "symlink", "symlinkat", "umask",
    # memory
    "mmap", "munmap", "mprotect", "mremap", "madvise", "brk", "msync", "mincore", "mbind", "get_mempolicy",
    "set_mempolicy", "membarrier",
    # threads, time, identity
    "futex", "futex_waitv", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield",
    "sched_getaffinity", "sched_getparam", "sched_getscheduler", "sched_getattr", "sched_get_priority_max",
    "sched_get_priority_min", "getpriority", "getcpu", "gettid", "getpid", "getppid", "getuid", "geteuid",
    "getgid", "getegid", "getgroups", "getresuid", "getresgid", "getpgrp", "getpgid", "getsid", "getrlimit",
    "getrusage", "times", "time", "gettimeofday", "clock_gettime", "clock_getres", "clock_nanosleep",
    "nanosleep", "sysinfo", "uname", "getrandom", "arch_prctl", "prctl", "exit", "exit_group", "wait4", "waitid",
    # signals and timers (kill/tgkill: see _OWN_PID)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait", "rt_sigsuspend",
    "sigaltstack", "restart_syscall", "alarm", "pause", "setitimer", "getitimer", "timer_create", "timer_settime",
    "timer_gettime", "timer_getoverrun", "timer_delete", "timerfd_create", "timerfd_settime", "timerfd_gettime",
    # waiting on descriptors; the inherited socket
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "pipe", "pipe2", "recvfrom", "recvmsg", "recvmmsg",
    "sendto", "sendmsg", "sendmmsg", "shutdown", "getsockname", "getpeername", "getsockopt", "setsockopt",
)
# ioctl requests a CPU worker makes (terminal queries, non-blocking and close-on-exec flags); with a GPU the
# driver's device ioctls are needed too, and Landlock limits them to the granted devices.
_IOCTLS = (0x5401, 0x540F, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)  # TCGETS TIOCGPGRP TIOCGWINSZ FIONREAD
#                                                                      FIONBIO FIONCLEX FIOCLEX
_SCMP_ACT_LOG = 0x7FFC0000
_SCMP_CMP_EQ = 4


def seccomp(*, any_ioctl: bool = False) -> Layer:
    """An allow-list filter on every thread (TSYNC): ALLOWED, clone for threads only, scheduling, limits and
    signals on the worker itself, the ioctl requests above; EPERM for DENIED, ENOSYS for everything else.
    COREJAX_SECCOMP_LOG=1 (measurement only) allows and logs what the list lacks instead of refusing it."""
    lib = _libseccomp()
    if lib is None:
        return Layer("seccomp", False, "libseccomp.so.2 not found (apt-get install libseccomp2)", available=False)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    logging = os.environ.get("COREJAX_SECCOMP_LOG") == "1"
    default = _SCMP_ACT_LOG if logging else _scmp_errno(errno.ENOSYS)
    ctx = lib.seccomp_init(default)
    if not ctx:
        return Layer("seccomp", False, "seccomp_init failed")
    eperm = _scmp_errno(errno.EPERM)
    unknown, count = [], 0

    def rule(action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nonlocal count
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            nr = _UNIFIED.get(name, -1)  # newer than this libseccomp: the number every architecture shares
        if nr < 0:
            unknown.append(name)
            return
        arr = (_ArgCmp * max(len(cmps), 1))(*[_ArgCmp(*c) for c in cmps])
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
        if rc != 0:
            raise OSError(-rc, f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")
        count += 1

    try:
        for name in ALLOWED:
            rule(_SCMP_ACT_ALLOW, name)
        for name in DENIED:
            rule(eperm, name)
        rule(_SCMP_ACT_ALLOW, "prlimit64", (2, _SCMP_CMP_EQ, 0, 0))  # reading limits
        rule(eperm, "prlimit64", (2, _SCMP_CMP_NE, 0, 0))  # a new limit
        ns = 0
        for flag in NAMESPACE_FLAGS:
            ns |= flag
        rule(_SCMP_ACT_ALLOW, "clone", (0, _SCMP_CMP_MASKED_EQ, CLONE_THREAD | ns, CLONE_THREAD))  # threads only
        for flag in NAMESPACE_FLAGS:
            rule(eperm, "clone", (0, _SCMP_CMP_MASKED_EQ, flag, flag))
        rule(eperm, "clone", (0, _SCMP_CMP_MASKED_EQ, CLONE_THREAD | ns, 0))  # a process, not a thread: a fork
        for name, arg in _SELF_ONLY:
            rule(_SCMP_ACT_ALLOW, name, (arg, _SCMP_CMP_EQ, 0, 0))
            rule(eperm, name, (arg, _SCMP_CMP_NE, 0, 0))
        me = os.getpid()
        for name, arg in _OWN_PID:
            rule(_SCMP_ACT_ALLOW, name, (arg, _SCMP_CMP_EQ, me, 0))
            rule(eperm, name, (arg, _SCMP_CMP_NE, me, 0))
        if any_ioctl:
            rule(_SCMP_ACT_ALLOW, "ioctl")
        else:
            for request in _IOCTLS:
                rule(_SCMP_ACT_ALLOW, "ioctl", (1, _SCMP_CMP_EQ, request, 0))
        # clone3 passes its flags in memory seccomp cannot read: ENOSYS (the default) makes glibc use clone.
        # A binary search over the syscall numbers (libseccomp 2.5+), not ~270 comparisons in a row: the
        # filter runs on every call, and a decode step makes hundreds (futex, the socket, the poll).
        lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_OPTIMIZE, 2)
        if lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_TSYNC, 1) != 0:
            return Layer("seccomp", False, "libseccomp cannot synchronise threads (SCMP_FLTATR_CTL_TSYNC)")
        rc = lib.seccomp_load(ctx)
        if rc != 0:
            return Layer("seccomp", False, f"seccomp_load failed: {os.strerror(-rc)}")
    except OSError as e:
        return Layer("seccomp", False, str(e))
    finally:
        lib.seccomp_release(ctx)
    skipped = [n for n in unknown if n not in ALLOWED]  # an allowed name this architecture lacks is no gap
    note = f"; not in this libseccomp: {', '.join(skipped)}" if skipped else ""
    if logging:
        return Layer("seccomp", False, f"LOGGING ONLY (COREJAX_SECCOMP_LOG=1): {count} rules, calls outside the "
                     "allow-list are allowed and logged, not refused", available=False)
    return Layer("seccomp", True, f"allow-list filter, {count} rules (ENOSYS otherwise; EPERM for exec, fork, "
                 f"memfd, namespaces; scheduling and signals only on itself; {len(_IOCTLS)} ioctl requests"
                 f"{' + device ioctls' if any_ioctl else ''}){note}")


# --- the whole policy ----------------------------------------------------------------------------------

def python_paths() -> tuple[list[str], list[str]]:
    """What the interpreter and its packages are read from: (folders and files to read, folders only to list).

    The interpreter's prefixes (stdlib, site-packages) are read whole. Other sys.path entries — a source
    checkout in an editable install, PYTHONPATH folders — may only be listed (imports look there), and of
    them only corejax's own packages (corejax/, kernels/) are readable: not the rest of the repository."""
    import importlib.util

    import corejax

    # corejax.kernels is the repository's top-level kernels/ folder (pyproject's package-dir): found, not
    # imported (importing it imports JAX, whose threads would then escape Landlock).
    kernels = importlib.util.find_spec("corejax.kernels")
    prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    real = [os.path.realpath(p) for p in prefixes]
    read = [*prefixes, os.path.dirname(os.path.abspath(corejax.__file__))]
    if kernels is not None and kernels.origin:
        read.append(os.path.dirname(os.path.abspath(kernels.origin)))
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


def own_proc() -> list[str]:
    return [f"/proc/{os.getpid()}"]
DEVICES = ("/dev/null", "/dev/zero")


def gpu_devices() -> list[str]:
    return [f"/dev/{n}" for n in sorted(os.listdir("/dev")) if n.startswith(("nvidia", "dri", "accel"))]


def apply(*, model_paths: Iterable[str], private_dirs: Iterable[str], extra_read: Iterable[str] = (),
          network_namespace: bool = True, max_file_bytes: int = 16 << 30, max_open_files: int = 4096,
          extra_tasks: int = 1024) -> list[Layer]:
    """Restricts the calling process for good. Call while it has one thread (Landlock binds only the caller)."""
    layers = []
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        layers.append(Layer("single_thread", False, f"{threads} threads existed before the policy"))
    layers.append(new_network_namespace() if network_namespace else
                  Layer("network_namespace", False, "off (network_namespace=False)", available=False))
    layers.append(set_rlimits(max_file_bytes=max_file_bytes, max_open_files=max_open_files, extra_tasks=extra_tasks))
    layers.append(drop_capabilities())
    layers.append(set_no_new_privs())
    python_read, python_list = python_paths()
    read = [*python_read, *SYSTEM_READ, *own_proc(), *model_paths, *extra_read]
    gpus = gpu_devices()  # listed before Landlock hides /dev
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1 and not any(layer.name == "single_thread" for layer in layers):
        layers.append(Layer("single_thread", False, f"{threads} threads started while the policy was prepared"))
    layers += landlock(read, private_dirs, [*DEVICES, *gpus], list_only=python_list)
    layers.append(seccomp(any_ioctl=bool(gpus)))
    return layers

