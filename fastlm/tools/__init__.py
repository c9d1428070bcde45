"""Tools built on the library, never imported by it: architecture comparison (compare.py),
the training-step profiler (profile.py) and GPU power readings (nvml.py)."""
