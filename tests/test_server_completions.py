"""logit_bias, echo and suffix (fill-in-the-middle) through `corejax serve`, with the real `openai` client on the
real SmolLM2 (and a tiny GGUF that has StarCoder's FIM tokens, which SmolLM2 lacks)."""

from __future__ import annotations

import pytest
from references import require
from test_server import API_KEY, CHAT, GENERATOR, ServerProcess
from tiny_model import write_tiny_llama

openai = require("openai")
PROMPT = "The capital of France is"
FIM_MODEL = "tiny-fim"


@pytest.fixture(scope="module")
def fim_gguf(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("fim") / f"{FIM_MODEL}.gguf", fim=True, context=128)


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf, fim_gguf):
    s = ServerProcess(tmp_path_factory.mktemp("serve-extras"), "-m", GENERATOR, "--allow-model", str(fim_gguf),
                      "--api-key", API_KEY)
    yield s
    assert s.stop() == 0, s.log_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from corejax import Session

    with Session(GENERATOR, progress=False, keep_alive=0) as s:
        yield s


def test_logit_bias_bans_and_forces_exactly(client, reference):
    """Banning the greedy first token gives the second most likely one (the unbiased run's logprobs say which);
    +100 forces a token at every step."""
    plain = client.completions.create(model=GENERATOR, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=5)
    top = plain.choices[0].logprobs.top_logprobs[0]
    ranked = sorted(top, key=top.get, reverse=True)
    assert ranked[0] == plain.choices[0].text
    want = reference.generate(PROMPT, max_tokens=1, temperature=0, logprobs=5)
    best, second = want.logprobs[0].top[0][0], want.logprobs[0].top[1][0]
    assert want.tokens[0] == best
    banned = client.completions.create(model=GENERATOR, prompt=PROMPT, max_tokens=1, temperature=0,
                                       logit_bias={str(best): -100})
    assert banned.choices[0].text == ranked[1] == reference.detokenize([second])
    both = client.completions.create(model=GENERATOR, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=5,
                                     logit_bias={str(best): -100, str(second): -100})
    assert both.choices[0].logprobs.tokens[0] == ranked[2]  # logprobs stay the raw model's
    forced_id = reference.tokenize(" banana", add_special=False)[0]
    forced = client.chat.completions.create(model=GENERATOR, messages=CHAT, max_tokens=3, temperature=0.8, seed=3,
                                            logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == reference.detokenize([forced_id] * 3)
    sampled = client.completions.create(model=GENERATOR, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5,
                                        logprobs=0, logit_bias={str(best): -100}, n=4)
    for choice in sampled.choices:  # a ban holds when sampling too, at every step
        assert reference.detokenize([best]) not in choice.logprobs.tokens


@pytest.mark.parametrize("bias, says", [
    ({"49152": 1}, "outside the vocabulary"),  # SmolLM2's ids are 0 to 49151
    ({"5": 100.5}, "[-100, 100]"),
    ({"5": -101}, "[-100, 100]"),
    ({"5": "1"}, "[-100, 100]"),
    ({"a": 1}, "token ids"),
    ({"-3": 1}, "token ids"),
    ({"1.5": 1}, "token ids"),
    ([1, 2], "object"),
])
def test_bad_logit_bias_is_400_naming_it(server, bias, says):
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": CHAT})):
        status, _, payload = server.request("POST", path, {"model": GENERATOR, "max_tokens": 1, "logit_bias": bias,
                                                           **body})
        assert status == 400, payload
        assert payload["error"]["param"] == "logit_bias" and says in payload["error"]["message"], payload


def test_python_api_logit_bias(reference):
    first = reference.generate(PROMPT, max_tokens=1, temperature=0, logprobs=2)
    banned = reference.generate(PROMPT, max_tokens=1, temperature=0, logit_bias={first.tokens[0]: -100})
    assert banned.tokens[0] == first.logprobs[0].top[1][0]
    with pytest.raises(Exception, match="outside the vocabulary"):
        reference.generate(PROMPT, max_tokens=1, logit_bias={10**6: 1.0})


def test_echo(client, server):
    plain = client.completions.create(model=GENERATOR, prompt=[PROMPT, "1, 2,"], max_tokens=5, temperature=0)
    echoed = client.completions.create(model=GENERATOR, prompt=[PROMPT, "1, 2,"], max_tokens=5, temperature=0,
                                       echo=True)
    assert [c.text for c in echoed.choices] == [PROMPT + plain.choices[0].text, "1, 2," + plain.choices[1].text]
    assert echoed.usage == plain.usage
    chunks = list(client.completions.create(model=GENERATOR, prompt=PROMPT, max_tokens=5, temperature=0,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text
    status, _, payload = server.request("POST", "/v1/completions", {"model": GENERATOR, "prompt": "x", "echo": True,
                                                                   "logprobs": 1})
    assert status == 400 and payload["error"]["param"] == "echo" and "logprobs" in payload["error"]["message"]
    status, _, payload = server.request("POST", "/v1/chat/completions", {"model": GENERATOR, "messages": CHAT,
                                                                        "echo": True})
    assert status == 400 and payload["error"]["param"] == "echo"


def test_suffix_fills_in_the_middle(client, server, fim_gguf):
    """The prompt becomes <fim_prefix>prompt<fim_suffix>suffix<fim_middle>: the same tokens, and so the same
    greedy text, as that prompt sent whole to the model."""
    from corejax import Session

    r = client.completions.create(model=FIM_MODEL, prompt="the ", suffix=" on", max_tokens=6, temperature=0)
    with Session(str(fim_gguf), progress=False, keep_alive=0) as s:
        want = s.generate("<fim_prefix>the <fim_suffix> on<fim_middle>", max_tokens=6, temperature=0)
        assert want.prompt_tokens[0] == s.tokenize("<fim_prefix>", add_special=False)[0]
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(want.prompt_tokens)
    echoed = client.completions.create(model=FIM_MODEL, prompt="the ", suffix=" on", max_tokens=6, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "the " + want.text  # echo shows the prompt as given
    status, _, payload = server.request("POST", "/v1/completions", {"model": GENERATOR, "prompt": "def f(",
                                                                   "suffix": "\n", "max_tokens": 2})
    assert status == 400 and payload["error"]["param"] == "suffix", payload
    assert GENERATOR in payload["error"]["message"] and "fill-in-the-middle" in payload["error"]["message"]
    status, _, payload = server.request("POST", "/v1/chat/completions", {"model": GENERATOR, "messages": CHAT,
                                                                        "suffix": "x"})
    assert status == 400 and payload["error"]["param"] == "suffix"
