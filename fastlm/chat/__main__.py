"""python -m fastlm.chat: see fastlm.chat.cli."""
import sys

from fastlm.chat.cli import main

sys.exit(main())
