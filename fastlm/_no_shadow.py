"""Keep the repository's top-level source folders from shadowing other distributions' modules.

kernels/ and bench/ sit at the top of the repository but install as fastlm.kernels and
fastlm.bench. When the repository root is on sys.path (Python started there, pytest's rootdir)
`import kernels` would otherwise find fastlm's folder first and hide Hugging Face's `kernels`,
which transformers imports whenever it loads a model. Each folder's __init__ calls
`hand_over` when it is imported under its bare name.
"""
import importlib
import os
import sys


def hand_over(name: str, init_file: str, keep_if_unowned: bool = False) -> None:
    """Replace the bare module `name` being imported from `init_file`'s folder by the one the
    rest of sys.path provides. Where nothing else provides it: fail as if the repository root
    were not on sys.path, or with keep_if_unowned stay this folder (it then hides nothing)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    saved = sys.path[:]
    # "" (and ".") stand for the working directory, which is the root when Python starts there.
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    ours = sys.modules.pop(name)
    try:
        # Re-entrant: this thread already holds `name`'s import lock, and the rest of sys.path
        # (and every meta-path finder, editable installs included) is searched as usual.
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        if keep_if_unowned:
            sys.modules[name] = ours
            return
        raise ModuleNotFoundError(
            f"No module named {name!r}: the repository's {name}/ folder is fastlm.{name}, "
            f"import it under that name", name=name) from None
    finally:
        sys.path[:] = saved
