"""python -m fastlm.eval: see fastlm.eval.core."""
import sys

from fastlm.eval.core import main

sys.exit(main())
