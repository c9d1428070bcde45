"""python -m fastlm.tokenizer: see fastlm.tokenizer.cli."""
import sys

from fastlm.tokenizer.cli import main

sys.exit(main())
