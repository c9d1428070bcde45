"""`python -m fastlm.plot`, the documented command; the code is fastlm.train.plot."""
import sys

from fastlm.train.plot import main

if __name__ == "__main__":
    sys.exit(main())
