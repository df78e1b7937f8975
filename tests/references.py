"""The one skip policy for the independent references (torch, transformers, sentence-transformers, gguf-py,
jsonschema, openai: the [test] extra). Where one is missing a test skips with the command that installs it,
except under CI (the CI variable set), where it fails: a parity test must never pass by not running."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"the reference package {module} is missing ({e}); install the test extra: pip install '.[test]'"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)
