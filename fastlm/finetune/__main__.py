"""python -m fastlm.finetune: see fastlm.finetune.loop."""
import sys

from fastlm.finetune.loop import main

sys.exit(main())
