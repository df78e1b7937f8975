"""The worker's seccomp filter (an allow-list, applied last by policy.apply), through the system's
libseccomp.so.2 via ctypes: which calls the worker may make, and on what arguments."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from corejax.sandbox.layer import NAMESPACE_FLAGS, Layer

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


# One process of a cluster (corejax/engine/distributed.py) joins the others over TCP after this filter is loaded: it
# may make IPv4/IPv6 (and netlink) sockets, connect, bind, listen and accept until policy.close_network() stacks a filter
# that refuses them all.
# (seccomp itself too: the second filter is loaded with it; a filter can only ever narrow what is allowed).
_NETWORK = ("connect", "bind", "listen", "accept", "accept4", "seccomp")
_AF_INET, _AF_INET6, _AF_NETLINK = 2, 10, 16  # netlink: getifaddrs (gloo finds its interface by address)


def _bind(lib: ctypes.CDLL) -> None:
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]


def seccomp(*, any_ioctl: bool = False, network: bool = False) -> Layer:
    """An allow-list filter on every thread (TSYNC): ALLOWED, clone for threads only, scheduling, limits and
    signals on the worker itself, the ioctl requests above; EPERM for DENIED, ENOSYS for everything else.
    network: TCP sockets and connections too (_NETWORK), for a process of a cluster until close_network
    (sockets of other families fall to the default, ENOSYS).
    COREJAX_SECCOMP_LOG=1 (measurement only) allows and logs what the list lacks instead of refusing it."""
    lib = _libseccomp()
    if lib is None:
        return Layer("seccomp", False, "libseccomp.so.2 not found (apt-get install libseccomp2)", available=False)
    _bind(lib)
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
            if not (network and name == "socket"):
                rule(eperm, name)
        if network:
            for name in _NETWORK:
                rule(_SCMP_ACT_ALLOW, name)
            for family in (_AF_INET, _AF_INET6, _AF_NETLINK):
                rule(_SCMP_ACT_ALLOW, "socket", (0, _SCMP_CMP_EQ, family, 0))
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
                 f"{' + device ioctls' if any_ioctl else ''}"
                 f"{'; TCP sockets until the cluster has joined' if network else ''}){note}")


def deny(name: str, calls: tuple[str, ...]) -> Layer:
    """A second filter stacked on the first, on every thread (TSYNC): `calls` fail with EPERM from now on,
    everything else is as the first filter decides."""
    lib = _libseccomp()
    if lib is None:
        return Layer(name, False, "libseccomp.so.2 not found", available=False)
    _bind(lib)
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        return Layer(name, False, "seccomp_init failed")
    try:
        for call in calls:
            nr = lib.seccomp_syscall_resolve_name(call.encode())
            if nr >= 0 and lib.seccomp_rule_add_array(ctx, _scmp_errno(errno.EPERM), nr, 0, None) != 0:
                return Layer(name, False, f"seccomp_rule_add({call}) failed")
        if lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_TSYNC, 1) != 0:
            return Layer(name, False, "libseccomp cannot synchronise threads (SCMP_FLTATR_CTL_TSYNC)")
        rc = lib.seccomp_load(ctx)
        if rc != 0:
            return Layer(name, False, f"seccomp_load failed: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
    return Layer(name, True, f"EPERM on every thread for {', '.join(calls)}")
