"""The families' real chat templates (llama.cpp's copies of their tokenizer_config.json templates) render in
corejax's sandbox exactly as transformers renders them: plain turns, system messages, tool definitions and tool
calls and results where the template has them."""

from __future__ import annotations

import pytest

from corejax.tokenizer.chat import render_chat_template
from references import require
from tokenizer_testdata import chat_templates_dir

require("transformers")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

TEMPLATES = ["Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "HuggingFaceTB-SmolLM3-3B", "google-gemma-2-2b-it",
             "ibm-granite-granite-3.3-2B-Instruct", "meta-llama-Llama-3.1-8B-Instruct",
             "meta-llama-Llama-3.2-3B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407",
             "microsoft-Phi-3.5-mini-instruct", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call0abc1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system and turns": [{"role": "system", "content": "You answer in one word."},
                         {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris."},
                         {"role": "user", "content": "And of Italy?"}],
    "tools": [{"role": "user", "content": "Weather in Paris?"}],
    "tool call and result": [{"role": "user", "content": "Weather in Paris?"}, CALL,
                             {"role": "tool", "tool_call_id": "call0abc1", "name": "get_weather",
                              "content": "{\"temperature\": 18}"}],
}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def _theirs(template: str, messages: list[dict], tools) -> str | None:
    try:
        out = render_jinja_template([messages], tools=tools, chat_template=template, add_generation_prompt=True,
                                    **SPECIAL)
    except Exception:  # noqa: BLE001 - a template that rejects this conversation (no tools, no system role)
        return None
    return out[0][0] if isinstance(out, tuple) else out[0]


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_real_templates_render_as_transformers_renders_them(name, conversation):
    template = (chat_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if conversation.startswith("tool") else None
    theirs = _theirs(template, messages, tools)
    if theirs is None:
        pytest.skip(f"{name} rejects this conversation in transformers too")
    ours = render_chat_template(template, messages, add_generation_prompt=True, tools=tools, **SPECIAL)
    assert ours == theirs  # Llama 3.x's templates print today's date (strftime_now): the same on both sides
