"""What a chat request's tools and the model's chat format make of it, in the parent process: the messages and
tools sent to the worker's template, the sampling (a forced call's grammar added), and the reply's parser."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from corejax.errors import InvalidParameterError
from corejax.tools.formats import ChatFormat
from corejax.tools.request import (
    ToolError,
    ToolRequest,
    chat_messages,
    generic_instructions,
    with_system,
)
from corejax.tools.stream import ReplyParser
from corejax.types.constraints import Constraint


@dataclasses.dataclass(frozen=True)
class Prepared:
    messages: list[dict]
    tools: list[dict] | None  # for the template's `tools` variable (None: the template is not given any)
    sampling: Any  # SamplingParams
    parser: Any  # a callable making a fresh ReplyParser, or None when the reply is plain text

    def new_parser(self) -> ReplyParser | None:
        return None if self.parser is None else self.parser()


def prepare(messages: Sequence[dict], tools: ToolRequest | None, fmt: ChatFormat, sampling: Any) -> Prepared:
    """The request as the worker renders it. tool_choice "none" leaves the tools out of the prompt; a template
    that knows no tools (generic) gets them in a system message; "required" or a named function constrains the
    reply to calls (so it cannot be combined with another constraint)."""
    active = tools is not None and tools.active
    generic = not fmt.template_takes_tools
    out = chat_messages(messages, generic)
    template_tools = None
    if active:
        parallel = tools.parallel and fmt.parallel
        if generic:
            out = with_system(out, generic_instructions(tools.tools, parallel))
        else:
            template_tools = [dict(t) for t in tools.tools]
        try:
            grammar = tools.grammar(fmt)
        except InvalidParameterError as e:  # a parameters schema corejax cannot enforce (jsonschema_prep's word)
            raise ToolError(f"the tools' parameter schemas cannot be enforced: {str(e)[:300]}", "tools") from None
        if grammar is not None:
            if sampling.constraint is not None:
                raise ToolError("tool_choice 'required' or a named function constrains the reply to tool calls, "
                                "so it cannot be combined with response_format, regex, choice or grammar",
                                "tool_choice")
            try:
                constraint = Constraint("grammar", grammar)
            except InvalidParameterError as e:  # llguidance's word on a parameters schema it cannot take
                raise ToolError(f"the tools' parameter schemas cannot be enforced: {str(e)[:300]}", "tools") from None
            sampling = dataclasses.replace(sampling, constraint=constraint)
    reasoning = fmt.reasoning is not None
    parser = None
    if active or reasoning:
        names = tools.names if active else None
        parallel = bool(active and tools.parallel and fmt.parallel)

        def parser() -> ReplyParser:
            return ReplyParser(fmt, names, tools=active, parallel=parallel, reasoning=reasoning)

    return Prepared(out, template_tools, sampling, parser)
