"""fastlm: a from-scratch LLM trainer whose hot paths are native kernels verified against PyTorch.

Start with `python -m fastlm.train`; the ops live in fastlm.ops, models in fastlm.models.
"""
from fastlm import native as _native

__version__ = "0.1.0"

_native.warn_once_if_missing()
