"""Tool calling: OpenAI's tools/tool_choice in, the family's chat-template format for them, and the model's calls
parsed from its text back into OpenAI's tool_calls (with Qwen3-style <think> reasoning apart from the answer).

The parent process does it all but the template rendering (the worker renders `tools` into the prompt):
corejax/tools/formats.py knows the formats, request.py checks the request's shapes, plan.py prepares a request,
stream.py parses the reply as it streams."""

from corejax.tools.formats import TOOL_FORMATS, ChatFormat, detect
from corejax.tools.plan import Prepared, prepare
from corejax.tools.request import ToolError, ToolRequest, chat_messages
from corejax.tools.stream import ReplyParser, parse_chunks

__all__ = ["TOOL_FORMATS", "ChatFormat", "Prepared", "ReplyParser", "ToolError", "ToolRequest", "chat_messages",
           "detect", "parse_chunks", "prepare"]
