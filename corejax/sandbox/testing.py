"""For containment tests only: run a function inside a sandboxed worker after its policy is applied.

A worker honours RUN_TEST only when it was started with --testing, which only this module passes; a normal
Session's worker refuses the frame, so no request can reach it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corejax.sandbox import messages
from corejax.session import Session


class TestingSession(Session):
    """A Session (model optional) whose worker also runs `module:function` probes: `session.run(target, *args)`.

    pythonpath: folders to put on the worker's sys.path (read-only under Landlock) so the probe module imports.
    """

    _testing = True
    __test__ = False  # not a pytest class

    def __init__(self, model: str | None = None, *, pythonpath: Sequence[str] = (), **kw: Any):
        kw.setdefault("progress", False)
        super().__init__(model, _pythonpath=pythonpath, **kw)

    def run(self, target: str, *args: Any) -> Any:
        """Calls `target` ("package.module:function") in the worker with msgpack-able args; returns its value."""
        return self._call(messages.RunTest(target, list(args))).value


def run_in_sandbox(target: str, *args: Any, model: str | None = None, pythonpath: Sequence[str] = (),
                   timeout: float | None = 60.0) -> Any:
    """One probe in a fresh sandboxed worker, which is stopped afterwards."""
    with TestingSession(model, pythonpath=pythonpath, timeout=timeout) as session:
        return session.run(target, *args)
