"""python -m fastlm.generate: see fastlm.generate.decode."""
import sys

from fastlm.command import run_command
from fastlm.generate.decode import main

sys.exit(run_command(main))
