"""python -m fastlm.eval: see fastlm.eval.core."""
import sys

from fastlm.command import run_command
from fastlm.eval.core import main

sys.exit(run_command(main))
