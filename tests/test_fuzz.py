"""The fuzzing harness (benchmarks/fuzz.py, issue 41): a short coverage-guided run of every target, and the
replay of every input a fuzzer has found to crash (tests/fuzz_regressions/<target>/), each of which must now end in
a corejax error or a result."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
sys.path.insert(0, str(BENCH))

import fuzz


def _regressions() -> list[Path]:
    return sorted(p for p in REGRESSIONS.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", _regressions(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_found_crash_is_now_a_corejax_error(path):
    fuzz.replay(path.parent.name, path.read_bytes())  # raises if the input escapes as anything else


@pytest.mark.parametrize("template", fuzz.HOSTILE_TEMPLATES)
def test_hostile_templates_end_in_a_template_error_in_bounded_time(template):
    from corejax.tokenizer.chat import (
        RENDER_SECONDS,
        TemplateError,
        render_chat_template,
    )

    t0 = time.monotonic()
    with pytest.raises(TemplateError):
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < RENDER_SECONDS + 2


def test_a_render_past_its_time_stops(monkeypatch):
    """The clock, not a size bound, ends this one: a loop that makes nothing."""
    from corejax.tokenizer import chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    t0 = time.monotonic()
    with pytest.raises(chat.TemplateError, match="ran past"):
        chat.render_chat_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                                  [])
    assert time.monotonic() - t0 < 3
    assert chat.render_chat_template("{{ 'still' }} fine", []) == "still fine"  # nothing left pending


def test_a_short_fuzz_run_of_every_target_finds_nothing(tmp_path):
    pytest.importorskip("atheris")
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(BENCH / "fuzz.py"), "--runs", "400", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["targets"]
    assert [r["target"] for r in rows] == list(fuzz.TARGETS)
    for r in rows:
        assert r["exit"] == 0 and r["crashes"] == 0, (r["target"], r.get("log_tail", "")[-2500:])
        assert r["inputs"] >= 400 and r["coverage"] > 0, r
    assert proc.returncode == 0
