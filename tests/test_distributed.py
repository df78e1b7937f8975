"""Several processes through jax.distributed (corejax/engine/distributed.py): two sandboxed processes on loopback, CPU
collectives over gloo, give the same greedy tokens as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from corejax import Session
from corejax.types.cluster import Cluster
from corejax.errors import InvalidParameterError

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_is_validated():
    for bad in ("localhost", ":80", "host:0", "host:70000", "host:http"):
        with pytest.raises(InvalidParameterError, match="HOST:PORT"):
            Cluster(bad, 2, 0)
    with pytest.raises(InvalidParameterError, match=r"process_id must be in 0\.\.1"):
        Cluster("h:1", 2, 2)
    with pytest.raises(InvalidParameterError, match="num_processes"):
        Cluster("h:1", 0, 0)
    with pytest.raises(InvalidParameterError, match="cluster"):
        Session("x", cluster="h:1")
    assert Cluster("10.0.0.1:7077", 3, 1).port == 7077
    assert not Cluster("10.0.0.1:7077", 3, 1).leader


def test_cluster_from_environment():
    env = {"COREJAX_COORDINATOR": "10.0.0.1:7077", "COREJAX_NUM_PROCESSES": "2", "COREJAX_PROCESS_ID": "1"}
    assert Cluster.from_env(env) == Cluster("10.0.0.1:7077", 2, 1)
    assert Cluster.from_env({"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "0"}) \
        == Cluster("h:9", 4, 0)
    assert Cluster.from_env({}) is None
    with pytest.raises(InvalidParameterError, match="COREJAX_PROCESS_ID"):
        Cluster.from_env({"COREJAX_COORDINATOR": "h:9", "COREJAX_NUM_PROCESSES": "2"})
    with pytest.raises(InvalidParameterError, match="integers"):
        Cluster.from_env({"COREJAX_COORDINATOR": "h:9", "COREJAX_NUM_PROCESSES": "two", "COREJAX_PROCESS_ID": "0"})


def test_two_processes_equal_one(smollm2_gguf):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device per process: the mesh spans the two processes
    procs = [subprocess.Popen([sys.executable, str(HERE / "cluster_run.py"), str(smollm2_gguf), str(port), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    got = json.loads(outs[0][0].strip().splitlines()[-1])
    layers = {layer["name"]: layer for layer in got["layers"]}
    assert layers["network_closed"]["engaged"], layers["network_closed"]
    assert layers["seccomp"]["engaged"] and layers["landlock"]["engaged"]
    assert not layers["network_namespace"]["engaged"]  # the host's network: the other process must be reachable

    with Session(smollm2_gguf, weights="f32", progress=False) as one:
        want = [list(one.generate(p, max_tokens=12, temperature=0, ignore_eos=True).tokens) for p in got["prompts"]]
    assert got["tokens"] == want
    assert got["ngram"] == want[1]  # drafted steps (T > 1) over two processes: still plain greedy decoding
