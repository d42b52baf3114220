"""The README's read order and faithfulness ledger point at functions, classes and tests that exist.

Every backticked name in those two sections is resolved in the source (by parsing it, nothing is imported):
`mla.MLA._attend_absorb` is a method of a class in mla.py; a bare name (`softmax_scale`, `MLA.forward`) belongs to
the file named last before it in the same row or item; `test_mla.py::test_x` is a test function in tests/, and a
bare `test_y` after it is in the same test file."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_HERE = {"ModelArgs"}  # named as what the code follows elsewhere (the official inference code's config class)
NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(\(.*\))?$")  # `a.b.c` or `a.b(...)`


def readme_section(title: str) -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def defined_names(path: str) -> set:
    """Dotted names defined in a Python file: functions and classes; the methods of classes and the attributes
    they set (`act_cache = ...` in the class, `self.x = ...`), also under the bare method name (`_attend_naive`
    for MLA._attend_naive)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()

    def walk(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + node.name)
                if isinstance(node, ast.ClassDef):
                    walk(node.body, prefix + node.name + ".")
                    for sub in ast.walk(node):
                        if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and \
                                isinstance(sub.value, ast.Name) and sub.value.id == "self":
                            names.add(f"{prefix}{node.name}.{sub.attr}")
                    for stmt in node.body:  # class attributes: `act_cache = "bf16"`
                        targets = stmt.targets if isinstance(stmt, ast.Assign) else \
                            [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
                        names.update(f"{prefix}{node.name}.{t.id}" for t in targets if isinstance(t, ast.Name))
    walk(tree.body, "")
    return names | {n.rsplit(".", 1)[1] for n in names if "." in n}


def defines(path: str, dotted: str) -> bool:
    """Whether the file at `path` defines `dotted`: parsed for Python, a whole-word match in CUDA source (a kernel,
    an enum, a host function)."""
    if path.endswith(".cu"):
        with open(path) as f:
            return re.search(rf"\b{re.escape(dotted)}\b", f.read()) is not None
    return dotted in defined_names(path)


def unresolved(text: str) -> list:
    """The backticked references in `text` (one row or item) that point at nothing."""
    missing, module, test_file = [], None, None
    for ref in re.findall(r"`([^`]+)`", text):
        ref = ref.strip()
        if "::" in ref:
            test_file, name = ref.split("::", 1)
            if not os.path.exists(os.path.join(ROOT, "tests", test_file)) or \
                    name not in defined_names(os.path.join(ROOT, "tests", test_file)):
                missing.append(ref)
        elif re.fullmatch(r"test_\w+\.py", ref):
            test_file = ref
            if not os.path.exists(os.path.join(ROOT, "tests", ref)):
                missing.append(ref)
        elif re.fullmatch(r"test_\w+", ref):
            if test_file is None or ref not in defined_names(os.path.join(ROOT, "tests", test_file)):
                missing.append(ref)
        elif re.fullmatch(r"[\w/]+\.(py|cu|md)", ref):  # a file, also in a folder (fp8_teaching/01_mma_sync.cu)
            if "/" not in ref and ref.endswith((".py", ".cu")):
                module = ref  # the names after it in the same row belong to it
            path = os.path.join(ROOT, ref)
            if not os.path.exists(path) and not os.path.exists(os.path.join(ROOT, "fp8_teaching", ref)):
                missing.append(ref)
        elif NAME.match(ref) and ref not in NOT_HERE:
            dotted = ref.split("(")[0]
            head, _, rest = dotted.partition(".")
            if rest and os.path.exists(os.path.join(ROOT, head + ".py")):
                module, dotted = head + ".py", rest
            elif rest and os.path.exists(os.path.join(ROOT, head, "__init__.py")):  # a package: fp8_teaching.gemm
                module, dotted = os.path.join(head, "__init__.py"), rest
            if module is None or not defines(os.path.join(ROOT, module), dotted):
                missing.append(ref)
    return missing


def ledger_rows() -> list:
    rows = [line for line in readme_section("Faithfulness ledger").splitlines() if line.startswith("| ")]
    return [r for r in rows[1:] if not r.startswith("|---")]  # without the header


def read_order_items() -> list:
    return re.split(r"\n(?=\d+\. )", readme_section("Read order"))


def test_the_ledger_and_read_order_are_found():
    assert len(ledger_rows()) >= 30 and len(read_order_items()) >= 7


@pytest.mark.parametrize("row", ledger_rows(), ids=lambda r: r.split("|")[1].strip()[:40])
def test_ledger_row_points_at_existing_code_and_tests(row):
    _, element, where, tests, _ = row.split("|")
    # Each cell on its own: a bare name in the test cell never resolves against the function cell's file.
    assert unresolved(where) + unresolved(tests) == []


@pytest.mark.parametrize("item", read_order_items()[1:], ids=lambda t: t.split("`")[1] if "`" in t else t[:20])
def test_read_order_points_at_existing_code(item):
    assert unresolved(item) == []
