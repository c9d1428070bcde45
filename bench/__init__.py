"""fastlm's benchmark suite, installed as fastlm.bench (`python -m fastlm.bench`)."""
