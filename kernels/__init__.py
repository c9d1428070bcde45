"""Triton kernels of fastlm, installed as fastlm.kernels: one module per op (<op>.py) holding
the kernels, their launchers and the torch.library registration of fastlm::<op>_*_triton.

Importing this package imports (and so registers) the module of every op whose row in
fastlm.ops.dispatch.IMPLEMENTED lists "triton": fastlm.ops.api.native_op imports it on the first
use of a Triton backend. A new kernels/<op>.py needs only that row.

Imported as a bare `kernels` (the repository root on sys.path), it steps aside for the
distribution that owns that name: Hugging Face's `kernels`, which transformers imports.
"""
if __name__ != "fastlm.kernels":
    from fastlm._no_shadow import hand_over

    hand_over(__name__, __file__)
else:
    import importlib

    from fastlm.ops.dispatch import IMPLEMENTED

    # importlib here is fine: this body runs in plain Python even when torch.compile traces the
    # `import fastlm.kernels` statement that triggers it.
    for _op, _backends in IMPLEMENTED.items():
        if "triton" in _backends:
            importlib.import_module(f"fastlm.kernels.{_op}")
