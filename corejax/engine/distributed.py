"""One model over several processes (one per host) through `jax.distributed`: the first process schedules, the
others follow.

JAX runs several processes as one program only when each calls the same jitted functions, in the same order,
on arrays laid out over one global mesh (multi-controller SPMD). corejax's scheduler decides every step on the
host — which rows, which prompt chunks, which pages — and that decision is not repeatable in another process
(it depends on when requests arrive). So only process 0 (the leader) runs the scheduler; before each call of
one of the engine's jitted programs it publishes the call's host arguments, and every other process (a
follower) makes the same call on its own shards of the weights and KV pages. The collectives inside the
program (corejax/engine/sharding.py's all-reduces and all-gathers over the global mesh) then meet, and the sampled
tokens come back replicated to every process; the leader's are the ones used.

What crosses from the leader to a follower, per call: the program's name and its arguments, encoded with the
msgpack codec of the worker protocol (corejax/wire/codec.py: never pickle) — numpy arrays as they are, and a
device array (the KV pages, the penalty state a step returned) as a handle: both sides number every output of
every call in the same order, so a handle names the same array on each. They travel through the coordination
service's key-value store (the connection jax.distributed already holds; no second channel), one key per
follower and call, deleted by the follower once read: a small fraction of a decode step on loopback
(docs/MEASUREMENTS.md).

Collectives between CPU processes go over gloo (TCP); on GPUs JAX uses NCCL. See docs/DISTRIBUTED.md for what
a user types, and corejax/sandbox/policy.py for the network rules of a sandboxed process.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from typing import Any

from corejax.errors import InvalidParameterError
from corejax.types.cluster import Cluster

# Every jit site of engine/programs.py but the encoder's: a cluster serves generative models only.
SITES = ("prefill", "decode_step", "copy_page", "full_logits", "token_logprobs")
_END = "end"


# --- joining -----------------------------------------------------------------------------------------------

_joined: Cluster | None = None


def joined() -> Cluster | None:
    """The cluster this process joined (join()), or None."""
    return _joined


def join(cluster: Cluster) -> None:
    """Connects this process to the others (jax.distributed.initialize) and opens the collectives' connections
    with one all-reduce and one all-gather over every device, so that when this returns every connection the
    model's programs will use exists (a sandboxed worker then forbids new ones: policy.close_network). Call
    before anything else touches JAX."""
    global _joined
    import jax

    if _joined is not None:
        if _joined != cluster:
            raise InvalidParameterError(f"this process already joined {_joined}; it cannot join {cluster}")
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(cluster.coordinator, num_processes=cluster.num_processes,
                                   process_id=cluster.process_id, initialization_timeout=cluster.timeout_s)
    except Exception as e:  # noqa: BLE001 - JAX raises RuntimeError/XlaRuntimeError with the gRPC status
        from corejax.errors import CorejaxError

        raise CorejaxError(
            f"process {cluster.process_id} of {cluster.num_processes} could not join the coordinator at "
            f"{cluster.coordinator} within {cluster.timeout_s} s: start every process with the same "
            f"--coordinator and --num-processes, process 0 first reachable at that address ({e})") from None
    _joined = cluster
    _gloo_on(_local_address(cluster))
    _open_collectives()


def _local_address(cluster: Cluster) -> str | None:
    """This host's address on the route to the coordinator (a UDP socket's connect sends nothing): where the
    other processes reach this one's collectives."""
    import socket

    host, _, port = cluster.coordinator.rpartition(":")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except OSError:
        return None


def _gloo_on(address: str | None) -> None:
    """JAX's CPU client with gloo collectives bound to `address`. JAX's default resolves the machine's host name
    instead, which needs the name-service files and may name an address the other hosts cannot reach."""
    if address is None:
        return
    try:
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        collectives = _jax.make_gloo_tcp_collectives(distributed_client=_client(), hostname=address)
        xla_bridge.register_backend_factory(
            "cpu", functools.partial(xla_bridge.make_cpu_client, collectives=collectives), priority=0)
    except (ImportError, AttributeError, TypeError):  # another JAX version: its own default stays
        pass


def _open_collectives() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("all",))
    n = mesh.devices.size
    x = jax.device_put(np.arange(n, dtype=np.float32), NamedSharding(mesh, P("all")))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    gathered = jax.jit(lambda a: a * 1, out_shardings=NamedSharding(mesh, P()))(x)
    if float(total) != n * (n - 1) / 2 or np.asarray(gathered).tolist() != list(range(n)):
        raise RuntimeError("the collectives between the processes returned wrong values")


def _client() -> Any:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def leave(wait_s: float = 30.0) -> None:
    """The leader tells the followers to stop; every process then meets at one barrier before it exits."""
    global _joined
    import jax

    if _joined is None:
        return
    if _joined.leader:
        _Channel(_joined).publish(_encode_end())
    try:
        _client().wait_at_barrier("corejax/leave", int(wait_s * 1000))
    except Exception:  # noqa: BLE001 - a process already gone: nothing to wait for
        pass
    # Every process disconnects from the coordination service before it exits: a follower whose coordinator
    # (the leader's process) vanished first would otherwise abort on its next heartbeat.
    try:
        jax.distributed.shutdown()
    except Exception:  # noqa: BLE001 - the service is already gone: nothing to disconnect from
        pass
    _joined = None


# --- the step channel --------------------------------------------------------------------------------------

class _Channel:
    """Leader -> followers messages in the coordination service's key-value store: key corejax/step/P/N is the
    N-th message to process P, deleted by P once read."""

    _sent = 0  # one sequence for the process: every Leader publishes into it

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.client = _client()
        self.received = 0

    def publish(self, payload: bytes) -> None:
        n = _Channel._sent
        for p in range(1, self.cluster.num_processes):
            self.client.key_value_set_bytes(f"corejax/step/{p}/{n}", payload)
        _Channel._sent = n + 1

    def receive(self) -> bytes:
        key = f"corejax/step/{self.cluster.process_id}/{self.received}"
        while True:
            try:
                payload = self.client.blocking_key_value_get_bytes(key, 60_000)
                break
            except Exception as e:  # noqa: BLE001 - JaxRuntimeError DEADLINE_EXCEEDED: idle; keep waiting
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self.client.key_value_delete(key)
        self.received += 1
        return payload


def _encode_end() -> bytes:
    from corejax.wire import codec

    return codec.pack({"site": _END})


# --- argument codec ---------------------------------------------------------------------------------------

def _dataclasses() -> dict[str, type]:
    from corejax.engine.cache import PagedKVCache
    from corejax.engine.sampling import PenaltyState, SamplingTensors
    from corejax.kernels.policy import Kernels

    return {c.__name__: c for c in (PagedKVCache, PenaltyState, SamplingTensors, Kernels)}


class _Handles:
    """Device arrays numbered in the order both sides create them: the params' and the KV pool's leaves, then
    every output leaf of every call."""

    def __init__(self) -> None:
        self.next = 0

    def number(self, tree: Any) -> list[tuple[int, Any]]:
        import jax

        out = []
        for leaf in jax.tree_util.tree_leaves(tree):
            out.append((self.next, leaf))
            self.next += 1
        return out


_leading = False  # a Leader exists in this process


class Leader:
    """The engine's programs (corejax/engine/programs.py: Programs) as the leader calls them: each call published to the
    followers, then run."""

    def __init__(self, programs: Any, params: Any, cache: Any, cfg: Any):
        import jax

        self._programs = programs
        self._params, self._cfg = params, cfg
        self._channel = _Channel(_joined)
        self._handles = _Handles()
        self._ids: dict[int, int] = {}   # id(array) -> its newest handle
        self._dropped: list[int] = []    # handles whose arrays the leader let go, for the followers to free
        self._lock = threading.Lock()
        global _leading
        if _leading:
            from corejax.errors import UnsupportedModelError

            raise UnsupportedModelError(
                "a cluster runs one model: a second engine (a draft model for speculative decoding) has no "
                "counterpart on the followers; use speculative={'method': 'ngram'}")
        _leading = True
        self._array = jax.Array
        self._classes = _dataclasses()
        self._register(params)
        self._register(cache)
        for site in SITES:
            setattr(self, site, functools.partial(self._call, site))

    def _register(self, tree: Any) -> None:
        for handle, leaf in self._handles.number(tree):
            key = id(leaf)
            self._ids[key] = handle
            weakref.finalize(leaf, self._drop, key, handle)

    def _drop(self, key: int, handle: int) -> None:
        if self._ids.get(key) == handle:
            del self._ids[key]
        self._dropped.append(handle)

    def _encode(self, x: Any) -> Any:
        import numpy as np

        if x is None or isinstance(x, (bool, int, float, str, np.ndarray)):
            return x
        if x is self._params:
            return {"params": 0}
        if x is self._cfg:
            return {"cfg": 0}
        if isinstance(x, np.generic):
            return {"scalar": np.asarray(x)}
        if isinstance(x, self._array):
            handle = self._ids.get(id(x))
            if handle is None:
                raise RuntimeError("a device array the followers do not hold was passed to a mirrored program")
            return {"h": handle}
        if isinstance(x, tuple):
            return {"tuple": [self._encode(v) for v in x]}
        name = type(x).__name__
        if dataclasses.is_dataclass(x) and self._classes.get(name) is type(x):
            return {"dc": name, "f": {f.name: self._encode(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        raise TypeError(f"cannot pass a {name} to a program run over several processes")

    def _call(self, site: str, *args: Any, **kwargs: Any) -> Any:
        from corejax.wire import codec

        with self._lock:
            dropped, self._dropped = self._dropped, []
            msg = {"site": site, "args": [self._encode(a) for a in args],
                   "kwargs": {k: self._encode(v) for k, v in kwargs.items()}, "drop": dropped}
            self._channel.publish(codec.pack(msg))
            out = getattr(self._programs, site)(*args, **kwargs)
            self._register(out)
        return out


def follow(programs: Any, params: Any, cache: Any, cfg: Any) -> int:
    """A follower's loop: runs each program call the leader publishes, until the leader leaves. Returns the
    number of calls run. A call that fails here failed on the leader too (same program, same inputs): it is
    reported on stderr and the loop goes on."""
    import sys

    import numpy as np

    from corejax.wire import codec

    channel = _Channel(_joined)
    handles = _Handles()
    store: dict[int, Any] = dict(handles.number(params))
    store.update(handles.number(cache))
    del cache  # the store holds the pool; each call's output replaces it
    classes = _dataclasses()

    def decode(x: Any) -> Any:
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "h" in x:
            return store[x["h"]]
        if "params" in x:
            return params
        if "cfg" in x:
            return cfg
        if "scalar" in x:
            return np.asarray(x["scalar"])[()]
        if "tuple" in x:
            return tuple(decode(v) for v in x["tuple"])
        return classes[x["dc"]](**{k: decode(v) for k, v in x["f"].items()})

    calls = 0
    while True:
        msg = codec.decode_payload(channel.receive())
        site = msg["site"]
        if site == _END:
            return calls
        for handle in msg["drop"]:
            store.pop(handle, None)
        try:
            out = getattr(programs, site)(*decode(msg["args"]), **{k: decode(v) for k, v in msg["kwargs"].items()})
        except Exception as e:  # noqa: BLE001 - the leader's call raised the same; keep numbering in step
            print(f"corejax follower: {site} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            out = None
        store.update(handles.number(out))
        calls += 1
