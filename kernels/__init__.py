"""Triton kernels of fastlm, installed as fastlm.kernels: one module per op (<op>.py) holding
the kernels, their launchers and the torch.library registration of fastlm::<op>_*_triton.

Importing this package imports (and so registers) every op module: fastlm.native imports it on
the first use of a Triton backend. A new kernels/<op>.py adds its line here.

Imported as a bare `kernels` (the repository root on sys.path), it steps aside for the
distribution that owns that name: Hugging Face's `kernels`, which transformers imports.
"""
if __name__ != "fastlm.kernels":
    from fastlm._no_shadow import hand_over

    hand_over(__name__, __file__)
else:
    from fastlm.kernels import (adamw_step, attention, cross_entropy, layer_norm,  # noqa: F401
                                linear_cross_entropy, rms_norm)
