"""The repository's modules import each other in one direction (DESIGN.md: no circular imports).

Each .py file at the top level and in its packages is parsed (not imported), every import of another module of
the repository is collected, imports inside functions included (a lazy import still ties two files together),
and the graph must have no cycle. A few directions the design fixes are checked by name as well. Last, each
concept file run as a script (layers.run_demo) ends quietly when its reader goes away.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def local_modules():
    """name -> path of every module a file of the repository can import: top-level .py files and packages."""
    mods = {}
    for name in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, name)
        if name.endswith(".py"):
            mods[name[:-3]] = path
        elif os.path.isfile(os.path.join(path, "__init__.py")) and name != "tests":
            mods[name] = os.path.join(path, "__init__.py")
    return mods


def imports_of(path, mods):
    """(module, name) pairs this file imports from the repository's modules (name None for `import module`)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in mods:
                    found.add((top, None))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top in mods:
                found.update((top, a.name) for a in node.names)
    return found


def graph():
    mods = local_modules()
    return {m: {dep for dep, _ in imports_of(p, mods)} - {m} for m, p in mods.items()}


def find_cycle(g):
    """One cycle of the graph as a list of modules (first == last), or None."""
    state = {}  # module -> 1 on the current path, 2 done

    def visit(m, path):
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                cyc = visit(d, path + [d])
                if cyc:
                    return cyc
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            cyc = visit(m, [m])
            if cyc:
                return cyc
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_circular_imports():
    g = graph()
    assert {"fp8", "fp8_experts", "fp8_bench", "moe", "model"} <= set(g)
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


@pytest.mark.parametrize("low, high", [("fp8", "fp8_experts"), ("fp8", "fp8_bench"), ("fp8_experts", "fp8_bench"),
                                       ("moe", "fp8_experts"), ("moe", "model"), ("mla", "model"),
                                       ("mtp", "model")])
def test_import_direction(low, high):
    """`low` is the lower layer: it must not import `high`, directly or through other modules."""
    g, seen, todo = graph(), set(), [low]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(g[m])
    assert high not in seen, f"{low} reaches {high}"


def private_uses(path, mods):
    """Private names of other repository modules this file uses: `from fp8 import _x` or `fp8._x`."""
    imported = {m for m, n in imports_of(path, mods) if n is None}
    uses = {f"from {m} import {n}" for m, n in imports_of(path, mods) if n and n.startswith("_")}
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                and node.attr.startswith("_")):
            uses.add(f"{node.value.id}.{node.attr}")
    return uses


def test_no_private_names_across_modules():
    """A module uses another module's public names only: a private one would tie it to the other's internals."""
    mods = local_modules()
    private = sorted(f"{os.path.basename(p)}: {u}" for p in mods.values() for u in private_uses(p, mods))
    assert private == []


@pytest.mark.slow
@pytest.mark.parametrize("demo", ["mla.py", "mla_decode.py", "moe.py", "mtp.py", "fp8.py"])
def test_concept_demo_into_a_closed_pipe_is_quiet(demo):
    """`python mla.py | head` (layers.run_demo): once the reader is gone, no traceback and exit status 0."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, demo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env=env)
    p.stdout.close()  # the reader goes away before the first line
    err = p.stderr.read()
    assert p.wait(timeout=300) == 0 and err == ""
