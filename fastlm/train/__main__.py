"""python -m fastlm.train: see fastlm.train.loop."""
import sys

from fastlm.train.loop import main

sys.exit(main())
