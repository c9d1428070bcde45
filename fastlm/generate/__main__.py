"""python -m fastlm.generate: see fastlm.generate.decode."""
import sys

from fastlm.generate.decode import main

sys.exit(main())
