"""What policy.py, seccomp.py and the parent share: a layer's report, the layers' names and which ones a Session
requires, and the namespace flags (a module of its own, so the seccomp module needs nothing from policy.py, which
imports it, and the parent, which never imports JAX, reads no policy code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from corejax.errors import InvalidParameterError

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME = 0x10000000, 0x20000000, 0x40000000, 0x00000080
NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                   CLONE_NEWNET, CLONE_NEWTIME)


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


def missing_layers(report: list[dict], require: dict[str, bool] | None) -> list[dict]:
    """The policy layers (a worker's report, one dict per Layer) that did not engage although they must: every
    layer this kernel offers (fail closed), plus those `require` insists on ({name: True}), minus those it waives
    ({name: False})."""
    require = require or {}
    return [layer for layer in report if not layer.get("engaged") and require.get(layer.get("name"), bool(
        layer.get("available", True))) is True]


SANDBOX_LAYERS = ("network_namespace", "rlimits", "capabilities", "no_new_privs", "landlock", "landlock_network",
                  "seccomp", "network_closed")  # network_closed: only a process of a cluster has it


def sandbox_require(require: Any) -> dict[str, bool]:
    if require is None:
        return {}
    if not isinstance(require, Mapping) or not all(isinstance(v, bool) for v in require.values()):
        raise InvalidParameterError("sandbox_require must map layer names to True (insist) or False (waive), e.g. "
                                    f"{{'landlock': False}}; got {require!r}")
    unknown = sorted(set(require) - set(SANDBOX_LAYERS))
    if unknown:
        raise InvalidParameterError(f"sandbox_require names unknown layers {unknown}; the layers are "
                                    f"{', '.join(SANDBOX_LAYERS)}")
    return dict(require)
