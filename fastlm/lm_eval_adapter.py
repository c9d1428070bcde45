"""`python -m fastlm.lm_eval_adapter`, the documented command; the code is fastlm.eval.lm_eval_adapter."""
import sys

from fastlm.command import run_command
from fastlm.eval.lm_eval_adapter import main

if __name__ == "__main__":
    sys.exit(run_command(main))
