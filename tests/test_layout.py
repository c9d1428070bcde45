"""The package's shape: every fastlm module's imports (module level and inside functions alike)
form no circle, and the library never reaches into the tools or the benchmarks."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Installed names of the repository's folders (kernels/ and bench/ install inside the package).
FOLDERS = {"fastlm": "fastlm", "fastlm.kernels": "kernels", "fastlm.bench": "bench"}
# Command entry points kept at their documented `python -m fastlm.X` names: they only start a tool.
TOOL_ENTRY_POINTS = {"fastlm.compare", "fastlm.profile"}


def is_tool(module: str) -> bool:
    return (module in TOOL_ENTRY_POINTS or module.startswith(("fastlm.tools", "fastlm.bench"))
            or module == "fastlm.__main__")


def modules() -> dict[str, str]:
    """Dotted name -> file for every module of the package."""
    found = {}
    for package, folder in FOLDERS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and d != "results"]
            rel = os.path.relpath(dirpath, base)
            if package == "fastlm" and rel.split(os.sep)[0] in ("kernels", "bench"):
                continue
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in filenames:
                if name.endswith(".py"):
                    mod = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    found[mod] = os.path.join(dirpath, name)
    return found


def imports_of(path: str, known: set[str]) -> set[str]:
    """The fastlm modules a file imports: `from fastlm.a import b` is fastlm.a.b when b is a
    module, else fastlm.a (importing a package's submodule does not count as importing the
    package's __init__ here: Python runs it, but it is not this module's choice)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fastlm"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.startswith("fastlm"):
            subs = {f"{node.module}.{a.name}" for a in node.names}
            hits = subs & known
            out.update(hits)
            if len(hits) < len(subs):
                out.add(node.module)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def test_the_walk_sees_the_package():
    g = graph()
    assert {"fastlm.ops.api", "fastlm.train.loop", "fastlm.kernels.attention",
            "fastlm.bench.utils", "fastlm.tools.profile"} <= set(g)
    assert "fastlm.ops.dispatch" in g["fastlm.ops.api"]


def test_no_import_circle():
    g = graph()
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_library_never_imports_tools_or_bench():
    g = graph()
    arrows = sorted(f"{m} -> {n}" for m, deps in g.items() if not is_tool(m)
                    for n in deps if is_tool(n))
    assert not arrows, "the library imports tools/bench:\n" + "\n".join(arrows)
