"""Ahead-of-time resource check of every GPU kernel, without a GPU: Triton kernels compiled
with triton.compile for sm_80 and sm_90 in every configuration their launchers can pick, CUDA
kernels with nvcc -Xptxas -v; shared memory, registers and spills per kernel and config.
The command line is bench/aot_check.py."""
