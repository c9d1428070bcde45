"""The real tools exported models are taken to (llama-cpp-python, lm-eval): a test needing one
skips with a reason where it is not installed, and fails instead where FASTLM_REQUIRE_INTEROP=1
(set by .ci/run, which installs them), so CI never passes by skipping them."""
import importlib
import os

import pytest


def require(module: str):
    """The module, imported; a skip (or, under FASTLM_REQUIRE_INTEROP=1, the ImportError)."""
    if os.environ.get("FASTLM_REQUIRE_INTEROP") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install "
                                              "-e '.[interop]')")
