"""Tool calling without a model: the reply parser of each format (whole, streamed in pieces of every size,
malformed, several calls), reasoning apart from content, the request checks, the forced-call grammars, and
real chat templates rendering tools, calls and results."""

from __future__ import annotations

import json

import pytest
from tokenizer_testdata import chat_templates_dir

from corejax.tokenizer.chat import render_chat_template
from corejax.tools import (
    ChatFormat,
    ReplyParser,
    ToolError,
    ToolRequest,
    chat_messages,
    detect,
    prepare,
)
from corejax.tools.formats import MAX_CALL_CHARS
from corejax.types.constraints import Constraint
from corejax.types.options import SamplingParams

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "additionalProperties": False}}}
NAMES = frozenset({"get_weather", "get_time"})

PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ROME = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
# (format, reply text, content, [(name, arguments)])
CASES = [
    ("hermes", f"<tool_call>\n{PARIS}\n</tool_call>", "", [("get_weather", {"city": "Paris"})]),
    ("hermes", f"Let me look.\n<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{ROME}\n</tool_call>",
     "Let me look.\n\n", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a call.", "No tools needed: 2 < 3 and <tool is not a call.",
     []),
    ("hermes", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \n</tool_call> after",
     "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \n</tool_call> after", []),  # bad JSON
    ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),  # not one of the tools
    ("hermes", f"<tool_call>\n{PARIS}", "", [("get_weather", {"city": "Paris"})]),  # the reply ended: read as is
    ("generic", f"<tool_call>{PARIS}</tool_call>", "", [("get_weather", {"city": "Paris"})]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {}}', "", [("get_time", {})]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
     "", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ("llama3", "It is sunny {maybe}.", "It is sunny {maybe}.", []),
    ("mistral", f"[TOOL_CALLS][{PARIS}, {ROME}]", "",
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    ("mistral", f"[{PARIS}]", "", [("get_weather", {"city": "Paris"})]),
    ("mistral", "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
]


def _run(fmt: str, text: str, size: int, *, parallel: bool = True, reasoning: bool = False):
    parser = ReplyParser(ChatFormat(fmt, "think" if reasoning else None), NAMES, tools=True, parallel=parallel,
                         reasoning=reasoning)
    pieces = [parser.feed(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    content = "".join(p.content for p in pieces)
    thoughts = "".join(p.reasoning for p in pieces)
    calls = [c for p in pieces for c in p.calls]
    return parser, content, thoughts, calls


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_each_format_parses_whole_and_in_pieces_of_every_size(fmt, text, content, calls):
    for size in range(1, len(text) + 1):
        parser, got, _, deltas = _run(fmt, text, size)
        assert got == content, size
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in deltas] == calls, size
        assert [c["index"] for c in deltas] == list(range(len(calls)))
        assert all(c["type"] == "function" for c in deltas)
        assert all(len(c["id"]) == 9 and c["id"].isalnum() if fmt == "mistral" else c["id"].startswith("call_")
                   for c in deltas)  # Mistral's templates refuse other ids when the calls come back
    from corejax.types.results import GenerationResult, Timings

    result = parser.result(GenerationResult(text, (), "stop", (), Timings(0, 0, 0, 0, 0, 0, 0, 0)))
    assert result.text == content
    assert result.finish_reason == ("tool_calls" if calls else "stop")
    assert [c["function"]["name"] for c in result.tool_calls] == [name for name, _ in calls]


def test_parallel_false_keeps_the_first_call():
    text = f"<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{ROME}\n</tool_call>"
    _, _, _, calls = _run("hermes", text, 7, parallel=False)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}]


def test_content_before_a_possible_marker_streams_at_once():
    parser = ReplyParser(ChatFormat("hermes"), NAMES, tools=True)
    assert parser.feed("Hello <tool").content == "Hello "  # "<tool" may open a call: held
    assert parser.feed("s> here").content == "<tools> here"  # it did not


def test_reasoning_comes_apart_from_content_and_calls():
    text = f"<think>\nThe user wants weather.\n</think>\n\nChecking.<tool_call>\n{PARIS}\n</tool_call>"
    for size in (1, 2, 3, 5, 8, 13, len(text)):
        _, content, thoughts, calls = _run("hermes", text, size, reasoning=True)
        assert thoughts == "\nThe user wants weather.\n"
        assert content == "Checking."
        assert len(calls) == 1
    plain = _run("hermes", "No thoughts here.", 3, reasoning=True)
    assert plain[1] == "No thoughts here." and plain[2] == ""
    cut = _run("hermes", "<think>still thinking", 4, reasoning=True)  # max_tokens mid-thought
    assert cut[1] == "" and cut[2] == "still thinking"


def test_a_runaway_call_becomes_content_within_bounds():
    text = "<tool_call>" + "x" * (MAX_CALL_CHARS + 10)
    _, content, _, calls = _run("hermes", text, 1 << 16)
    assert calls == [] and content == text


def test_request_checks_name_the_field():
    assert ToolRequest.of(None) is None
    req = ToolRequest.of([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, False)
    assert req.forced and req.named and req.choice == "get_time" and not req.parallel
    assert not ToolRequest.of([WEATHER], "none").active
    for args, param in [(([{"type": "function"}],), "tools"), (("not a list",), "tools"),
                        (([{"type": "function", "function": {"name": "bad name!"}}],), "tools"),
                        (([WEATHER, WEATHER],), "tools"), (([WEATHER], "sometimes"), "tool_choice"),
                        (([WEATHER], {"type": "function", "function": {"name": "other"}}), "tool_choice"),
                        ((None, "required"), "tool_choice"), (([WEATHER], "auto", "yes"), "parallel_tool_calls")]:
        with pytest.raises(ToolError) as e:
            ToolRequest.of(*args)
        assert e.value.param == param, args


@pytest.mark.parametrize("fmt", ["hermes", "generic", "llama3", "mistral"])
def test_forced_grammars_are_valid_and_refuse_another_constraint(fmt):
    req = ToolRequest.of([WEATHER, TIME], "required")
    Constraint("grammar", req.grammar(ChatFormat(fmt)))  # llguidance accepts it
    sp = SamplingParams.from_kwargs(regex="a+")
    with pytest.raises(ToolError) as e:
        prepare([{"role": "user", "content": "hi"}], req, ChatFormat(fmt), sp)
    assert e.value.param == "tool_choice"


def test_generic_format_puts_tools_in_a_system_message_and_results_in_text():
    req = ToolRequest.of([WEATHER])
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    msgs = [{"role": "user", "content": "Weather?"}, call, {"role": "tool", "tool_call_id": "c1", "content": "18C"}]
    out = prepare(msgs, req, ChatFormat("generic"), SamplingParams())
    assert out.tools is None and out.messages[0]["role"] == "system" and "get_weather" in out.messages[0]["content"]
    assert out.messages[2] == {"role": "assistant", "content": f"<tool_call>\n{PARIS}\n</tool_call>"}
    assert out.messages[3] == {"role": "user", "content": "<tool_response>\n18C\n</tool_response>"}
    with pytest.raises(ToolError):
        chat_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
                      False)


TEMPLATE_FORMATS = {"Qwen-Qwen2.5-7B-Instruct": ChatFormat("hermes"), "Qwen-Qwen3-0.6B": ChatFormat("hermes", "think"),
                    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ChatFormat("hermes"),
                    "meta-llama-Llama-3.1-8B-Instruct": ChatFormat("llama3"),
                    "meta-llama-Llama-3.2-3B-Instruct": ChatFormat("llama3"),
                    "mistralai-Mistral-Nemo-Instruct-2407": ChatFormat("mistral"),
                    "google-gemma-2-2b-it": ChatFormat("generic"), "Qwen3-Coder": ChatFormat("generic")}


@pytest.mark.parametrize("name", sorted(TEMPLATE_FORMATS))
def test_real_templates_are_recognised(name):
    assert detect((chat_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")) == TEMPLATE_FORMATS[name]


def test_qwen25_template_renders_tools_calls_and_results():
    template = (chat_templates_dir() / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 18}'}]
    out = prepare(msgs, ToolRequest.of([WEATHER]), detect(template), SamplingParams())
    text = render_chat_template(template, out.messages, tools=out.tools, bos_token="", eos_token="")
    assert '"name": "get_weather"' in text and "<tools>" in text  # the tool's definition
    assert f"<tool_call>\n{PARIS}\n</tool_call>" in text  # the call, its arguments an object again
    assert '<tool_response>\n{"temperature": 18}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory):
    """A tiny random llama carrying Qwen2.5's real template, sandboxed: the tools cross the wire to the worker,
    which renders them; the reply's format (hermes) comes from the worker's info."""
    from tiny_model import write_tiny_llama

    import corejax

    template = (chat_templates_dir() / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    path = write_tiny_llama(tmp_path_factory.mktemp("qwen-tiny") / "tiny.gguf", context=2048,
                            chat_template=template)
    with corejax.Session(str(path), progress=False, keep_alive=0, warmup=False) as session:
        yield session


def test_a_hermes_model_gets_the_tools_in_its_template_and_forced_calls(qwen_tiny):
    import jsonschema

    assert qwen_tiny.info()["chat_format"] == {"tools": "hermes", "reasoning": None}
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = qwen_tiny.generate(messages=msgs, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
                           max_tokens=120, temperature=0)
    prompt = qwen_tiny.detokenize(r.prompt_tokens)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt and '"name": "get_time"' in prompt
    assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1, r
    call = r.tool_calls[0]["function"]
    schema = {"get_weather": WEATHER, "get_time": TIME}[call["name"]]["function"]["parameters"]
    jsonschema.validate(json.loads(call["arguments"]), schema)
    plain = qwen_tiny.generate(messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=2, temperature=0)
    assert "<tools>" not in qwen_tiny.detokenize(plain.prompt_tokens) and not plain.tool_calls


def test_random_replies_never_raise_and_lose_no_text():
    """Replies spliced from markers, JSON fragments and text, fed in random pieces: the parser never raises, and
    what is not a call or a thought comes out as content, in order."""
    import random

    parts = ["<tool_call>", "</tool_call>", "<think>", "</think>", "[TOOL_CALLS]", "<|python_tag|>", PARIS, "{", "}",
             "[", "]", '"name"', ": ", "\n", "hi ", "<", "</", "<tool", "x" * 5, '{"name": "get_time", "arguments": {}}']
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        fmt = rng.choice(["hermes", "generic", "llama3", "mistral"])
        parser = ReplyParser(ChatFormat(fmt, "think"), NAMES, tools=True, reasoning=rng.random() < 0.5)
        pieces, at = [], 0
        while at < len(text):
            n = rng.randint(1, 9)
            pieces.append(parser.feed(text[at:at + n]))
            at += n
        pieces.append(parser.finish())
        content = "".join(p.content for p in pieces)
        calls = [c for p in pieces for c in p.calls]
        if not calls and not parser.thought:
            assert content == text, (fmt, text)
        for call in calls:
            assert call["function"]["name"] in NAMES and isinstance(json.loads(call["function"]["arguments"]), dict)


def test_a_template_that_opens_the_think_block_starts_the_reply_inside_it():
    template = (chat_templates_dir() / "llama-cpp-deepseek-r1.jinja").read_text(encoding="utf-8")
    prompt = render_chat_template(template, [{"role": "user", "content": "Hi"}], bos_token="", eos_token="")
    fmt = detect(template, prompt)
    assert fmt.reasoning == "opened"
    parser = ReplyParser(fmt, None, tools=False, reasoning=True)
    pieces = [parser.feed(t) for t in ("Let me think.", "\n</th", "ink>\n\nHello!")] + [parser.finish()]
    assert "".join(p.reasoning for p in pieces) == "Let me think.\n"
    assert "".join(p.content for p in pieces) == "Hello!"


@pytest.mark.parametrize("name", ["meta-llama-Llama-3.1-8B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407",
                                  "NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "Qwen-Qwen3-0.6B"])
def test_a_parsed_call_and_its_result_go_back_through_the_template(name):
    """The reply's call, as the parser returns it, is accepted back by the family's template with its result."""
    template = (chat_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")
    fmt = detect(template)
    reply = {"hermes": f"<tool_call>\n{PARIS}\n</tool_call>", "mistral": f"[TOOL_CALLS][{PARIS}]",
             "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}'}[fmt.tools]
    parser = ReplyParser(fmt, NAMES, tools=True)
    calls = parser.feed(reply).calls + parser.finish().calls
    assert len(calls) == 1
    call = {k: v for k, v in calls[0].items() if k != "index"}
    msgs = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None,
                                                               "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 18}'}]
    out = prepare(msgs, ToolRequest.of([WEATHER]), fmt, SamplingParams())
    text = render_chat_template(template, out.messages, tools=out.tools, bos_token="<s>", eos_token="</s>")
    assert "Paris" in text and "temperature" in text and "get_weather" in text  # Llama's tojson's the result


def test_the_text_only_functions_refuse_tools():
    import corejax
    from corejax.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="Session"):
        corejax.generate(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    with pytest.raises(InvalidParameterError, match="Session"):
        corejax.stream(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
