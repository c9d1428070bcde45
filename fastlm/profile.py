"""`python -m fastlm.profile`, the documented command; the code is fastlm.tools.profile."""
import sys

from fastlm.command import run_command
from fastlm.tools.profile import main

if __name__ == "__main__":
    sys.exit(run_command(main))
