"""For containment tests only: a Session whose sandboxed worker is tests/probe_worker.py, which runs a function
inside the worker after its policy is applied (`session.run("module:function", *args)`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corejax.client.session import Session
from corejax.wire.protocol import Kind

TESTS = str(Path(__file__).resolve().parent)


class ProbeSession(Session):
    """A Session (model optional) whose worker also runs `module:function` probes. pythonpath: folders the
    worker imports the probes from (read-only under Landlock); this folder always."""

    _worker_module = "probe_worker"
    __test__ = False  # not a pytest class

    def __init__(self, model: str | None = None, *, pythonpath: Sequence[str] = (), **kw: Any):
        kw.setdefault("progress", False)
        super().__init__(model, _pythonpath=[TESTS, *[p for p in pythonpath if p != TESTS]], **kw)

    def run(self, target: str, *args: Any) -> Any:
        """Calls `target` ("package.module:function") in the worker with msgpack-able args; returns its value
        (a crash, a timeout or a memory overrun raise as for any request)."""
        return self._call(Probe(target, list(args))).value


@dataclasses.dataclass(frozen=True)
class Probe:
    """A PROBE request, in the shape of corejax/wire/messages.py's requests."""

    KIND = Kind.PROBE
    target: str
    args: list

    def to_wire(self) -> dict:
        return {"target": self.target, "args": self.args}
