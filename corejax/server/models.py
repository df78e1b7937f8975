"""The models one `corejax serve` may answer for: an allow-list, loaded on first use, at most max_models at a
time (least recently used idle one evicted), each unloaded after its keep_alive.

Safety: a request names a model by its id, never by a path. The ids a request may name are fixed when the server
starts: the -m models, each `--allow-model NAME|PATH` (a path is resolved once, at start, to its id: the file's
or folder's name), and with `--allow-registry` every registry model already in the local cache (a request never
starts a download). Anything else is a 404 that names the model and what is allowed.

Each model runs in its own Session (its own sandboxed worker). Loading runs on a thread, so the event loop keeps
serving /health and other models' streams meanwhile; concurrent first requests for one model share one load. A
model is busy while it has requests in flight or requests waiting for its load; a busy model is never evicted
(all max_models busy: 503 with Retry-After). keep_alive follows Ollama: a duration ("5m", "1h30m", "300ms"), a
number of seconds, 0 (unload when its last request ends) or negative (keep until evicted); a request's own
keep_alive replaces the model's, as in Ollama. Models preloaded with -m keep no expiry until a request gives one.

All bookkeeping runs on the event loop's thread (no locks): a decision and the state it reads never have an
await between them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from corejax import errors, hub
from corejax.server.schema import ApiError

log = logging.getLogger("corejax.server")

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, what: str = "keep_alive") -> float | None:
    """Seconds from Ollama's keep_alive: a number of seconds or a Go-style duration ("5m", "1h30m", "-1");
    None stays None (the model's or the server's default). A negative result means forever (math.inf)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ApiError(400, f"{what} must be a duration like \"5m\" or a number of seconds; got {value!r}", param=what)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ApiError(400, f"{what} must be a duration like \"5m\", \"1h30m\" or \"300ms\", or a number "
                                    f"of seconds (0: unload after this request; negative: keep loaded); got "
                                    f"{value!r}", param=what) from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ApiError(400, f"{what} must be a duration string or a number of seconds; got {type(value).__name__}",
                       param=what)
    if math.isnan(seconds):
        raise ApiError(400, f"{what} must be a number of seconds; got {value!r}", param=what)
    return math.inf if seconds < 0 or seconds > 1e9 else seconds  # over 30 years: forever (and a valid timer)


def allowed_models(preload: Iterable[str | None], allow: Iterable[str], allow_registry: bool) -> dict[str, Any]:
    """{model id: what Session() opens}: registry names as themselves, paths as their resolved ModelSource.
    Paths are resolved here, once, from the operator's command line; requests only ever name the ids."""
    out: dict[str, Any] = {}
    for name in [*preload, *allow]:
        if name is None:
            name = hub.DEFAULT_MODEL
        if name in hub.REGISTRY:
            out.setdefault(name, name)
            continue
        source = hub.resolve(name, pull=False, progress=False)  # ModelNotFoundError/ModelFormatError: at start
        if source.name in out and out[source.name] != source:
            raise errors.InvalidParameterError(f"two allowed models share the id {source.name!r} ({name} and "
                                               f"{out[source.name]}); rename one")
        out.setdefault(source.name, source)
    if allow_registry:
        for name in hub.REGISTRY:
            if hub.is_cached(name):
                out.setdefault(name, name)
    return out


@dataclasses.dataclass
class _Slot:
    """A loaded model's pool state (its ServedModel counts the requests in flight)."""

    model: Any  # app.ServedModel
    keep_alive_s: float | None = None  # the latest request's keep_alive; None: the server's default
    pinned: bool = False  # preloaded (-m): no expiry until a request gives a keep_alive
    loaded_at: float = dataclasses.field(default_factory=time.time)
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    expires_at: float | None = None  # wall-clock time it unloads, while idle with a finite keep_alive
    timer: asyncio.TimerHandle | None = None
    size_bytes: int = 0


class ModelPool:
    """The loaded models (`loaded`, id -> ServedModel, least recently used first) and the rest of the allow-list.

    load: a blocking function from (id, what Session() opens) to a ServedModel, run on a thread."""

    def __init__(self, allowed: dict[str, Any], load: Callable[[str, Any], Any] | None, *,
                 max_models: int | None = None, keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S):
        self.allowed = dict(allowed)
        self.allow_registry = False  # --allow-registry: a registry model pulled later (Ollama's /api/pull) joins
        self._load = load
        self.max_models = max_models
        self.keep_alive_s = float("inf") if keep_alive_s is not None and keep_alive_s < 0 else keep_alive_s
        self.loaded: OrderedDict[str, Any] = OrderedDict()
        self._slots: dict[str, _Slot] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._waiting: dict[str, int] = {}
        self._closing: set[asyncio.Task] = set()

    def add_loaded(self, model: Any) -> None:
        """A model loaded before the server started (-m): no expiry until a request gives it a keep_alive."""
        self.allowed.setdefault(model.id, model.id)
        self.loaded[model.id] = model
        self._slots[model.id] = _Slot(model, pinned=True, size_bytes=_size(model))

    # --- what requests see -------------------------------------------------------------------------------

    def default_id(self) -> str | None:
        """The model a request without one gets: the only one allowed, else None."""
        return next(iter(self.allowed)) if len(self.allowed) == 1 else None

    def status(self, model_id: str) -> str:
        return "loaded" if model_id in self.loaded else "loading" if model_id in self._loading else "unloaded"

    async def get(self, model_id: str, keep_alive: Any = None) -> Any:
        """The loaded ServedModel of an allowed id (loading it first if needed). Call its requests' admission
        at once after this returns (no await between), so nothing evicts it in between."""
        seconds = parse_keep_alive(keep_alive)
        if model_id not in self.allowed:
            raise ApiError(404, f"the model {model_id!r} is not served here; this server may serve "
                                f"{', '.join(self.allowed)} (corejax serve -m / --allow-model / --allow-registry)",
                           param="model", code="model_not_found")
        if model_id not in self.loaded:
            await self._wait_loaded(model_id)
        slot = self._slots[model_id]
        self.loaded.move_to_end(model_id)
        slot.last_used = time.monotonic()
        if seconds is not None:
            slot.keep_alive_s = seconds
        self._cancel_timer(slot)
        # A request refused before its admission (a 400, a 429) never reaches release(): once the caller ran to its
        # next await, a model nobody admitted starts its keep_alive here.
        asyncio.get_running_loop().call_soon(self.release, slot.model)
        return slot.model

    def release(self, model: Any) -> None:
        """A request of this model ended (ServedModel.in_flight already counted down): start its keep_alive."""
        slot = self._slots.get(model.id)
        if slot is None or slot.model is not model or self._busy(model.id):
            return
        slot.last_used = time.monotonic()
        ttl = slot.keep_alive_s
        if ttl is None:
            ttl = None if slot.pinned else self.keep_alive_s
        self._cancel_timer(slot)
        if ttl is None or ttl == float("inf"):
            slot.expires_at = None
            return
        slot.expires_at = time.time() + ttl
        if ttl == 0:
            self._unload(model.id, "keep_alive 0")
        else:
            slot.timer = asyncio.get_running_loop().call_later(ttl, self._expire, model.id, model)

    def unload(self, model_id: str) -> bool:
        """Unloads a model now if idle (True); a busy one unloads when its last request ends (keep_alive 0), as
        Ollama's keep_alive 0 request does. False when it is not loaded."""
        slot = self._slots.get(model_id)
        if slot is None:
            return False
        slot.keep_alive_s = 0.0
        if not self._busy(model_id):
            self._unload(model_id, "unload asked")
        return True

    def listing(self) -> list[dict]:
        """Every allowed model with its state, in the allow-list's order (-m models first)."""
        return [{"id": m, "status": self.status(m)} for m in self.allowed]

    def ps(self) -> list[dict]:
        """The loaded models, for Ollama's /api/ps: id, what was opened (a registry name or a path), bytes the
        worker reserved (weights, KV pool, workspace), when it loaded, and when it unloads (epoch seconds;
        None while a request runs or with no expiry), and the requests in flight."""
        out = []
        for model_id, model in self.loaded.items():
            slot = self._slots[model_id]
            source = self.allowed.get(model_id)
            out.append({"id": model_id, "source": str(getattr(source, "path", source)), "size_bytes": slot.size_bytes,
                        "loaded_at": slot.loaded_at, "expires_at": slot.expires_at, "in_flight": model.in_flight,
                        "generates": model.generates})
        return out

    def usage(self, model_id: str) -> dict:
        """A loaded model's size_bytes and expires_at (epoch seconds, None: no expiry now); {} otherwise."""
        slot = self._slots.get(model_id)
        return {} if slot is None else {"size_bytes": slot.size_bytes, "expires_at": slot.expires_at}

    # --- loading and unloading ---------------------------------------------------------------------------

    def _busy(self, model_id: str) -> bool:
        model = self.loaded.get(model_id)
        return (model is not None and model.in_flight > 0) or self._waiting.get(model_id, 0) > 0 \
            or model_id in self._loading

    async def _wait_loaded(self, model_id: str) -> None:
        task = self._loading.get(model_id)
        if task is None:
            if self._load is None:
                raise ApiError(503, f"{model_id} is not loaded and this server cannot load models",
                               type="server_error")
            evicted = self._make_room(model_id)
            task = asyncio.create_task(self._load_task(model_id, evicted))
            self._loading[model_id] = task
        self._waiting[model_id] = self._waiting.get(model_id, 0) + 1
        try:
            await asyncio.shield(task)
        finally:
            self._waiting[model_id] -= 1
            if not self._waiting[model_id]:
                del self._waiting[model_id]

    def _make_room(self, model_id: str) -> list[Any]:
        """Evicts least recently used idle models until one more fits; 503 when every slot is busy."""
        evicted = []
        if self.max_models is None:
            return evicted
        while len(self.loaded) + len(self._loading) >= self.max_models:
            idle = next((m for m in self.loaded if not self._busy(m)), None)
            if idle is None:
                busy = [*self.loaded, *self._loading]
                raise ApiError(503, f"cannot load {model_id}: this server holds at most {self.max_models} "
                                    f"model(s) (corejax serve --max-models) and every one is busy "
                                    f"({', '.join(busy)}); retry shortly", type="server_error",
                               code="models_busy", headers={"Retry-After": "2"})
            evicted.append(self._unload(idle, f"evicted for {model_id}"))
        return evicted

    def _unload(self, model_id: str, why: str) -> asyncio.Task:
        model = self.loaded.pop(model_id)
        slot = self._slots.pop(model_id)
        self._cancel_timer(slot)
        log.info("unloading %s (%s)", model_id, why)
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(model.session.close))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    async def _load_task(self, model_id: str, evicted: list[asyncio.Task]) -> None:
        try:
            if evicted:  # the evicted workers' memory is free before the next one reserves its own
                await asyncio.gather(*evicted, return_exceptions=True)
            log.info("loading %s", model_id)
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(self._load, model_id, self.allowed[model_id])
            except errors.MemoryBudgetError as e:
                raise ApiError(507, f"{model_id} does not fit this server's memory budget: {e}",
                               type="server_error", param="model", code="insufficient_memory") from None
            except errors.CorejaxError as e:
                raise ApiError(503, f"{model_id} could not be loaded: {e}", type="server_error", param="model",
                               code="model_load_failed", headers={"Retry-After": "5"}) from None
            self.loaded[model_id] = model
            self._slots[model_id] = _Slot(model, size_bytes=_size(model))
            log.info("loaded %s in %.1f s", model_id, time.perf_counter() - started)
        finally:
            del self._loading[model_id]

    def _expire(self, model_id: str, model: Any) -> None:
        slot = self._slots.get(model_id)
        if slot is None or slot.model is not model or self._busy(model_id):
            return
        if slot.expires_at is not None and slot.expires_at <= time.time() + 0.01:
            self._unload(model_id, "keep_alive expired")

    @staticmethod
    def _cancel_timer(slot: _Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        slot.expires_at = None


def _size(model: Any) -> int:
    """Bytes the model's worker reserved against its budget (weights, KV pool, workspace)."""
    memory = getattr(model, "info", {}).get("memory") or {}
    return int(memory.get("used") or 0)
