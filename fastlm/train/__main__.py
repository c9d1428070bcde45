"""python -m fastlm.train: see fastlm.train.loop."""
import sys

from fastlm.command import run_command
from fastlm.train.loop import main

sys.exit(run_command(main))
