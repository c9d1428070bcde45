"""`python -m fastlm.plot`, the documented command; the code is fastlm.train.plot."""
import sys

from fastlm.command import run_command
from fastlm.train.plot import main

if __name__ == "__main__":
    sys.exit(run_command(main))
