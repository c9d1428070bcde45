"""fastlm: a from-scratch LLM trainer whose hot paths are native kernels verified against PyTorch.

Start with `python -m fastlm.train`; the ops live in fastlm.ops, models in fastlm.models.
Importing fastlm itself imports nothing heavy (the tokenizer CLI needs no torch); fastlm.native,
imported by fastlm.ops, loads the native module and says once if it is missing.
"""
import os as _os

__version__ = "0.1.0"

# torch's CPU allocator backs allocations of 2 MB and more with transparent huge pages when
# THP_MEM_ALLOC_ENABLE=1, read once at torch's first allocation, so it is set here, before
# fastlm's commands import torch (a user's own setting wins; 0 turns it off). Training steps
# allocate their large gradients afresh: on 4 KB pages the first touch of GPT-2's (50257, 768)
# ones was ~0.3 s of page faults a step, and the gpt2-124m CPU step ran 16% faster with it
# (2 threads, Zen 3 EPYC; peak RSS +1%). Linux only; elsewhere torch ignores the variable.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
