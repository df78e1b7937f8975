"""The test suite's worker (tests/probes.py starts it with `python -m probe_worker`): corejax's sandboxed worker,
policy and all, whose request loop also answers PROBE frames by calling `module:function` with the frame's
arguments, after the policy is applied. corejax's own worker refuses PROBE: this module is the only handler."""

from __future__ import annotations

import importlib
from typing import Any

from corejax.wire import messages
from corejax.wire.protocol import Kind
from corejax.worker.main import WorkerLoop, main


class ProbeLoop(WorkerLoop):
    def _handle(self, frame: Any) -> None:
        if frame.kind != Kind.PROBE:
            return super()._handle(frame)
        module, _, name = str(frame.payload["target"]).partition(":")
        value = getattr(importlib.import_module(module), name)(*frame.payload.get("args", []))
        self.conn.send(Kind.RESULT, frame.rid, messages.Value(value).to_wire())
        return None


if __name__ == "__main__":
    main(loop_class=ProbeLoop)
