"""`python -m fastlm.demo_tasks`, the documented command; the code is fastlm.eval.demo_tasks."""
import sys

from fastlm.command import run_command
from fastlm.eval.demo_tasks import main

if __name__ == "__main__":
    sys.exit(run_command(main))
