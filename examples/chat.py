"""Chat: pass messages=[...] and the model's own chat template formats them (ChatML for SmolLM2).

    python examples/chat.py
    python examples/chat.py --model path/to/an-instruct-model.gguf

A two-turn conversation: the first reply is appended to the history before the second question.
"""

import argparse

import corejax

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None,
                    help=f"an instruct model with a chat template (default: {corejax.DEFAULT_MODEL})")
parser.add_argument("--max-tokens", type=int, default=40)
args = parser.parse_args()

session = corejax.Session(args.model, progress=False)
# A system message ({"role": "system", "content": "..."}) may come first; SmolLM2's template adds its own
# default one when none is given, and this small model answers best with that default.
messages = [{"role": "user", "content": "What is the capital of France?"}]

for follow_up in ["What is a famous landmark there?", None]:
    result = session.generate(messages=messages, max_tokens=args.max_tokens, temperature=0)
    print(f"user:      {messages[-1]['content']}")
    print(f"assistant: {result.text.strip()}")
    print(f"           ({result.timings.prompt_tokens} prompt tokens, finish_reason={result.finish_reason})\n")
    # Keep the history: the reply goes back in as an assistant message, then the next user turn.
    messages.append({"role": "assistant", "content": result.text})
    if follow_up:
        messages.append({"role": "user", "content": follow_up})

# corejax.generate / corejax.stream take messages= the same way:
#     corejax.generate(messages=[{"role": "user", "content": "Hi!"}], max_tokens=20)
