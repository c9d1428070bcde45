"""python -m fastlm.finetune: see fastlm.finetune.loop."""
import sys

from fastlm.command import run_command
from fastlm.finetune.loop import main

sys.exit(run_command(main))
