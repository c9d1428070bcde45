"""python -m fastlm.export: see fastlm.export.hf."""
import sys

from fastlm.export.hf import main

sys.exit(main())
