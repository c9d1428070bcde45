"""fastlm's benchmark suite, installed as fastlm.bench (`python -m fastlm.bench`).

Imported as a bare `bench` (the repository root on sys.path), it steps aside for any
distribution that owns that name; where none does it stays, so `pytest bench/` (which imports
this folder as `bench`) collects bench/test_kernels.py. Its modules import each other as
fastlm.bench.*.
"""
if __name__ != "fastlm.bench":
    from fastlm._no_shadow import hand_over

    hand_over(__name__, __file__, keep_if_unowned=True)
