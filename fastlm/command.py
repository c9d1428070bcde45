"""How every fastlm command ends: each entry point calls `sys.exit(run_command(main))`.

An error a command does not handle itself becomes one line on stderr, naming the command and
the error (exit status 1), instead of a traceback; FASTLM_DEBUG=1 shows the traceback.
Ctrl-C ends a command with status 130 and one line (training saves a checkpoint first: it
catches the signal itself).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable


def command_name() -> str:
    """The module the user ran: fastlm.train for `python -m fastlm.train` (its __main__)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name if spec is not None else os.path.basename(sys.argv[0] or "fastlm")
    return name.removesuffix(".__main__")


def run_command(main: Callable[[], int | None]) -> int:
    """main()'s exit status, or 1 (130 for Ctrl-C) with one line on stderr for what escaped it."""
    try:
        return main() or 0
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print(f"{command_name()}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- the last line of defence of a user-facing command
        if os.environ.get("FASTLM_DEBUG") == "1":
            raise
        text = str(exc).strip().splitlines()
        what = type(exc).__name__ + (f": {text[0]}" if text else "")
        print(f"{command_name()}: error: {what} (FASTLM_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
