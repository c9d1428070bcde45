"""Triton kernels of fastlm, installed as fastlm.kernels: one module per op (<op>.py) holding
the kernels, their launchers and the torch.library registration of fastlm::<op>_*_triton."""
