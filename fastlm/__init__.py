"""fastlm: a from-scratch LLM trainer whose hot paths are native kernels verified against PyTorch.

Start with `python -m fastlm.train`; the ops live in fastlm.ops, models in fastlm.models.
Importing fastlm itself imports nothing heavy (the tokenizer CLI needs no torch); fastlm.native,
imported by fastlm.ops, loads the native module and says once if it is missing.
"""
__version__ = "0.1.0"
