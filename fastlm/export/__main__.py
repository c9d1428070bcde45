"""python -m fastlm.export: see fastlm.export.hf."""
import sys

from fastlm.command import run_command
from fastlm.export.hf import main

sys.exit(run_command(main))
