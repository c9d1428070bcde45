"""python -m fastlm.tokenizer: see fastlm.tokenizer.cli."""
import sys

from fastlm.command import run_command
from fastlm.tokenizer.cli import main

sys.exit(run_command(main))
