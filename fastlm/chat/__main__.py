"""python -m fastlm.chat: see fastlm.chat.cli."""
import sys

from fastlm.chat.cli import main
from fastlm.command import run_command

sys.exit(run_command(main))
