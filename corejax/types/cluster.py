"""Where a process stands among several serving one model (corejax/engine/distributed.py joins them): plain data
a Session validates in the parent, which never imports JAX."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from corejax.errors import InvalidParameterError

# The environment variables `corejax serve` and Session read when no cluster is given (JAX's own names work
# too: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
ENV = ("COREJAX_COORDINATOR", "COREJAX_NUM_PROCESSES", "COREJAX_PROCESS_ID")
_JAX_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process stands among several: the coordinator's HOST:PORT (process 0 listens there), how many
    processes, and this one's id (0 schedules and serves; the others follow)."""

    coordinator: str
    num_processes: int
    process_id: int
    timeout_s: int = 300  # how long start-up waits for every process to join

    def __post_init__(self) -> None:
        host, sep, port = str(self.coordinator).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidParameterError(f"coordinator must be HOST:PORT (e.g. 10.0.0.1:7077); got {self.coordinator!r}")
        for name in ("num_processes", "process_id", "timeout_s"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise InvalidParameterError(f"{name} must be an integer; got {getattr(self, name)!r}")
        if self.num_processes < 1:
            raise InvalidParameterError(f"num_processes must be at least 1; got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise InvalidParameterError(
                f"process_id must be in 0..{self.num_processes - 1} (num_processes={self.num_processes}); "
                f"got {self.process_id}")
        if self.timeout_s < 1:
            raise InvalidParameterError(f"timeout_s must be a positive number of seconds; got {self.timeout_s}")

    @property
    def leader(self) -> bool:
        return self.process_id == 0

    @property
    def port(self) -> int:
        return int(self.coordinator.rpartition(":")[2])

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any] | None) -> Cluster | None:
        return None if d is None else cls(**d)

    @classmethod
    def of(cls, value: Any) -> Cluster | None:
        """Session(cluster=...)'s argument as a Cluster: None, a Cluster, or a dict of its fields."""
        if value is None or isinstance(value, Cluster):
            return value
        if isinstance(value, Mapping):
            try:
                return cls(**value)
            except TypeError as e:
                raise InvalidParameterError(f"cluster: {e}; give coordinator, num_processes and process_id") from None
        raise InvalidParameterError(
            f"cluster must be a corejax.Cluster or a dict; got {type(value).__name__}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Cluster | None:
        """The cluster the environment names (COREJAX_COORDINATOR, COREJAX_NUM_PROCESSES, COREJAX_PROCESS_ID,
        or JAX's JAX_* names), or None when it names none."""
        env = os.environ if env is None else env
        for names in (ENV, _JAX_ENV):
            values = [env.get(n) for n in names]
            if values[0]:
                missing = [n for n, v in zip(names, values) if not v]
                if missing:
                    raise InvalidParameterError(f"{names[0]} is set but {', '.join(missing)} is not")
                try:
                    return cls(values[0], int(values[1]), int(values[2]))
                except ValueError:
                    raise InvalidParameterError(
                        f"{names[1]} and {names[2]} must be integers; got {values[1]!r}, {values[2]!r}") from None
        return None
