"""Talk to `corejax serve` with OpenAI's own client library (pip install openai).

    corejax serve                            # in one terminal: the default model on http://127.0.0.1:8000/v1
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

Without --base-url this script starts `corejax serve` itself on a free loopback port, and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request

import openai


@contextlib.contextmanager
def local_server():
    """`corejax serve` on a free port, until the block ends (SIGTERM: it drains and exits)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from corejax.cli import main; main()", "serve", "--port",
                             str(port), "--log-level", "warning"])
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit("corejax serve exited before it was ready")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=None, help="a running corejax serve (default: start one here)")
    args = parser.parse_args()
    with (contextlib.nullcontext(args.base_url) if args.base_url else local_server()) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none")  # no --api-key on the server: any key works
        model = client.models.list().data[0].id
        print(f"model: {model}")

        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        print(f"chat: {reply.choices[0].message.content!r} ({reply.usage.completion_tokens} tokens, "
              f"finish_reason={reply.choices[0].finish_reason})")

        print("stream: ", end="", flush=True)
        for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=24,
                                               temperature=0.7, seed=7, stream=True):
            print(chunk.choices[0].text, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
