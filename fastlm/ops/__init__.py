"""fastlm's ops: `fastlm.ops.layer_norm(...)` and friends pick the fastest backend for the tensors'
device and run it.

  api.py       the public ops (argument checks, then the chosen backend; loads the Triton
               kernels on first use)
  dispatch.py  IMPLEMENTED (the one op list) and DISPATCH (which backend per op and device)
  native.py    loads fastlm._C; says once what is missing and why
  triton_support.py  whether Triton can run here and why not (read by the kernels too)
  autograd.py  fake kernels + autograd per op, shared by the C++ and Triton registrations
  reference.py the float32 PyTorch oracle every backend is tested against
"""
from fastlm.ops.api import (adamw_step, attention, cross_entropy, layer_norm,  # noqa: F401
                            linear_cross_entropy, linear_cross_entropy_chunk_rows, native_op,
                            rms_norm)
from fastlm.ops.dispatch import (BACKENDS, DISPATCH, IMPLEMENTED, SMALL_DISPATCH,  # noqa: F401
                                 SMALL_LOGITS_BYTES, BackendUnavailableError, available_backends,
                                 select_backend, set_backend, unavailable_reason)
