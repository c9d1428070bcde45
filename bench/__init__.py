"""fastlm's benchmark suite, installed as fastlm.bench (`python -m fastlm.bench`).

Imported as a bare `bench` (the repository root on sys.path), it steps aside for any
distribution that owns that name, or fails as if the folder were not there.
"""
if __name__ != "fastlm.bench":
    from fastlm._no_shadow import hand_over

    hand_over(__name__, __file__)
