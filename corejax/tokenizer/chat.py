"""Chat templates: the jinja programs stored in model files, rendered in a sandbox as HF renders them."""

from __future__ import annotations

import datetime
import json
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
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


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelFormatError(f"the model's chat template is not valid jinja ({e.message}, line {e.lineno}); "
                               "pass chat_template=... to use another one") from None


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Renders `template` with HF's variables: messages, add_generation_prompt, bos_token, eos_token, tools..."""
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template tried an unsafe operation ({e}); use a trusted template") from None
    except Exception as e:  # a template is a program: any failure inside it is the template's
        raise TemplateError(f"the chat template failed on these messages ({type(e).__name__}: {e}); "
                            "check the message roles/fields the template expects") from None
