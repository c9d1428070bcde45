"""`python -m fastlm.compare`, the documented command; the code is fastlm.tools.compare."""
import sys

from fastlm.command import run_command
from fastlm.tools.compare import main

if __name__ == "__main__":
    sys.exit(run_command(main))
