"""Chat templates: the jinja programs stored in model files, rendered in a sandbox as HF renders them."""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from corejax.errors import InvalidParameterError, ModelFormatError


class TemplateError(InvalidParameterError):
    """A chat template that raised (raise_exception) or failed to render for the given messages."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template rejected the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # HF overrides jinja's tojson: no HTML escaping, unicode kept as is.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


# A template is a program from a model file: what it may make is bounded (a rendered prompt is at most a few MB of
# text; legitimate templates take milliseconds). Every way to grow a string or number by more than a constant per
# step is checked before it runs (*, **, +, %, ~, and the filters that take a size); loops are bounded by the
# sandbox's range (100,000 items) and by the clock.
MAX_RENDER_CHARS = 16 << 20
RENDER_SECONDS = 5.0
_MAX_POWER_BITS = 4096


def _too_big(n: int) -> TemplateError:
    return TemplateError(f"the chat template tried to make {n:,} characters, more than the {MAX_RENDER_CHARS:,} a "
                         "prompt may have; use a trusted template")


def _sized(x: Any) -> int:
    return len(x) if isinstance(x, (str, list, tuple)) else 0


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace(), whose attributes (the one state a template carries across loop iterations) are bounded."""

    def __setitem__(self, name: str, value: Any) -> None:
        if _sized(value) > MAX_RENDER_CHARS:
            raise _too_big(_sized(value))
        super().__setitem__(name, value)


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """`a ~ b` compiled to a bounded join (jinja's str_join cannot be intercepted by the sandbox)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CodeGenerator

    @staticmethod
    def bounded_join(parts: tuple) -> str:
        texts = [str(p) for p in parts]
        total = sum(len(t) for t in texts)
        if total > MAX_RENDER_CHARS:
            raise _too_big(total)
        return "".join(texts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _sized(seq) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                    raise _too_big(len(seq) * n)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(left.bit_length(), 1) * right > _MAX_POWER_BITS:
                raise TemplateError("the chat template computed a power too large to hold; use a trusted template")
        elif operator == "+" and _sized(left) + _sized(right) > MAX_RENDER_CHARS:
            raise _too_big(_sized(left) + _sized(right))
        elif operator == "%" and isinstance(left, str):
            import re

            widths = [int(w) for w in re.findall(r"%[-+ #0]*(\d+)", left)]
            if any(w > MAX_RENDER_CHARS for w in widths) or "*" in left:
                raise TemplateError("the chat template formatted a field too wide; use a trusted template")
        return super().call_binop(context, operator, left, right)


def _width_checked(name: str, fn: Any, size: Any) -> Any:
    """A jinja filter whose result's size `size(value, *args, **kwargs)` is checked before it runs."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        n = size(*args, **kwargs)
        if n > MAX_RENDER_CHARS:
            raise _too_big(n)
        return fn(*args, **kwargs)

    checked.__name__ = name
    if hasattr(fn, "jinja_pass_arg"):  # pass_eval_context / pass_environment: jinja passes it first, to both
        checked.jinja_pass_arg = fn.jinja_pass_arg
    return checked


def _bounded_join(join: Any) -> Any:
    """jinja's join over a list it makes first, so the result's size is known before it is built."""

    def bounded(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> Any:
        items = list(value)
        if attribute is None:
            n = sum(len(str(x)) for x in items) + len(str(d)) * max(0, len(items) - 1)
            if n > MAX_RENDER_CHARS:
                raise _too_big(n)
        return join(eval_ctx, items, d, attribute)

    bounded.jinja_pass_arg = join.jinja_pass_arg
    return bounded


def _replace_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    s, old, new = str(s), str(old), str(new)
    n = s.count(old) if old else len(s) + 1
    return len(s) + n * max(0, len(new) - len(old))


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Environment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    f = env.filters
    f["center"] = _width_checked("center", f["center"], lambda v, width=80: max(len(str(v)), int(width)))
    f["indent"] = _width_checked("indent", f["indent"], lambda v, width=4, *a, **k: len(str(v)) * (
        1 + (int(width) if isinstance(width, int) else len(str(width)))))
    f["replace"] = _width_checked("replace", f["replace"], lambda ctx, s, old, new, count=None: _replace_size(
        s, old, new, count))
    f["format"] = _width_checked("format", f["format"], lambda v, *a, **k: max(
        [len(str(v))] + [int(w) for w in __import__("re").findall(r"%[-+ #0]*(\d+)", str(v))]) + (
        MAX_RENDER_CHARS + 1 if "*" in str(v) else 0))
    f["join"] = _bounded_join(f["join"])
    f["wordwrap"] = _width_checked("wordwrap", f["wordwrap"], lambda ctx, s, width=79, *a, **k: 2 * len(str(s)))
    env.globals["namespace"] = _Namespace
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelFormatError(f"the model's chat template is not valid jinja ({e.message}, line {e.lineno}); "
                               "pass chat_template=... to use another one") from None
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as e:  # jinja's parser recurses
        raise ModelFormatError(f"the model's chat template cannot be compiled ({type(e).__name__}: {str(e)[:200]}); "
                               "pass chat_template=... to use another one") from None


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Renders `template` with HF's variables: messages, add_generation_prompt, bos_token, eos_token, tools..."""
    compiled = _compile(template)
    try:
        with _deadline(RENDER_SECONDS):
            parts, total = [], 0
            for part in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **variables):
                total += len(part)
                if total > MAX_RENDER_CHARS:
                    raise _too_big(total)
                parts.append(part)
            return "".join(parts)
    except TemplateError:
        raise
    except _RenderTimeout:
        raise TemplateError(f"the chat template ran past {RENDER_SECONDS:g} s; use a trusted template") from None
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template tried an unsafe operation ({e}); use a trusted template") from None
    except Exception as e:  # a template is a program: any failure inside it is the template's
        raise TemplateError(f"the chat template failed on these messages ({type(e).__name__}: {e}); "
                            "check the message roles/fields the template expects") from None


class _RenderTimeout(BaseException):
    """Raised into a render that ran past its time (a BaseException, so no template-level handler catches it)."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Stops the calling thread's Python code with _RenderTimeout once `seconds` pass (CPython's per-thread
    asynchronous exception: raised at the next bytecode, which a template's loops reach at every iteration)."""
    import ctypes

    tid, lock, state = threading.get_ident(), threading.Lock(), {"done": False, "fired": False}

    def fire() -> None:
        with lock:
            if not state["done"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_RenderTimeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
        timer.cancel()
        if state["fired"]:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)  # one not yet raised: dropped
