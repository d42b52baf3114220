"""Exercise mode: an instructor turns chosen functions into exercises, a learner implements them, tests grade them.

    python exercises.py list                                          # the ready-made sets and their functions
    python exercises.py make --out DIR --set routing [--function moe.route ...]   # instructor: a student copy
    python exercises.py grade [DIR] [--set NAME ...] [--function NAME ...]        # learner: a grade per function

`make` copies the repository (its git-tracked files, and untracked ones git does not ignore; outside git, the
source, text and test files) to DIR, except its own tests (tests/test_*.py hold the answers: a test's vectorized
reference, the correct line beside each planted mistake), and, in every chosen function, replaces the body with
`raise NotImplementedError("exercise: module.Qualified.name")`. The signature, the decorators and the docstring
stay, and so do the body's comments, as a skeleton to follow: a line `q_lat = torch.einsum(...)  # (B, T, H, c)`
becomes `# q_lat = ...  # (B, T, H, c)`, full-line comments are kept as they are, each at its original indentation.
Functions are located with `ast` (methods and nested classes by their qualified name, `mla.MLA._attend_absorb`);
comments are read from the source text with `tokenize`. DIR/EXERCISES.md lists, per function, the tests that
grade it; DIR/exercises.json holds the same list for `grade`.

`grade` runs exactly those tests (tests/grading/, each marked `@pytest.mark.grades("module.Qualified.name")`) in one
pytest process on DIR's code and prints, per function: passed; failed, with the first failing line of the test and
the error; or not started (its stub still raises NotImplementedError). It exits 0 when every graded function passed,
1 otherwise, 2 on bad input. A test that runs longer than --timeout seconds fails (an endless loop costs one test,
not the grade). Run from another copy of the repository (the instructor's, on homework handed in), it grades with
that copy's grading tests only if DIR's are the same bytes, and refuses otherwise; it runs the student's code with
the caller's permissions, so handed-in work is best graded outside the repository.

How one gap does not fail everything. A grading test of F calls F alone and compares it with a plain formula written
in the test itself from the report's definitions (an explicit per-head softmax(q·k)·v, an enumeration of all group
subsets, an fp64 sum per 128-wide K block, ...), never only with the repository's other path, so a mistake that the
naive and the fast path share still fails. Where F's code calls another exercise G (rope_frequencies calls
yarn_correction_range, route calls limit_groups, verify_draft calls probs_from_logits, the MLA layer's constructor
calls softmax_scale), the test replaces G for its own duration (pytest's monkeypatch) with the test's plain version
of G, always, whether the learner has written G or not: F's grade then speaks of F alone, and an unfinished or wrong
G never fails F. The substitute comes from the test file, not from the solution: a student copy must not hold the
solution (an encoded copy would hide nothing from a learner who looks, and a copy kept outside DIR would tie grading
to the instructor's machine), and the tests' plain versions (loops, enumerations, bisection) say what to compute,
which the docstring says already, but not how to compute it the way the exercise asks (vectorized, in the report's
layout). A test that still meets a stub of another function reports "needs G (not started)", a bug of the test.
The rest of the copy stays whole, and some of it computes an exercise's result another way (the naive and fused
paths beside `_attend_absorb`, `latent_attention_ref` beside `latent_attention_split`): a learner may read them, as
any part of the repository, but the grading tests replace them with functions that fail, so that calling them is not
an answer.

Adding an exercise: write its grading test in tests/grading/ with the marker, and add the function to a set in SETS
below; tests/test_exercises.py checks that every listed function exists, can be stubbed and has grading tests.
"""
import argparse
import ast
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import tokenize

ROOT = os.path.dirname(os.path.abspath(__file__))
GRADING_DIR = os.path.join("tests", "grading")
MANIFEST = "exercises.json"
STUB_PREFIX = "exercise: "

# name → (what the learner writes, functions). The order is the suggested order of assignments.
SETS = {
    "rope-yarn": ("RoPE on interleaved pairs, YaRN's frequency ramp and softmax scale (report §2.1.1)",
                  ["mla.yarn_correction_range", "mla.rope_frequencies", "mla.apply_rotary_emb", "mla.softmax_scale"]),
    "mla-absorb": ("MLA's absorbed attention: W^UK folded into the query, W^UV into the output (report §2.1.1)",
                   ["mla.MLA._attend_absorb"]),
    "flash-decode": ("flash decoding over the latent cache: ranges of tiles, an online softmax, their merge (the "
                     "fused decode kernel's algorithm)", ["mla_decode.latent_attention_split"]),
    "routing": ("group-limited top-k routing with the bias used for selection only (report §2.1.2)",
                ["moe.limit_groups", "moe.route"]),
    "bias-update": ("auxiliary-loss-free balancing: b_i += γ·sign(mean load − load_i) (report §2.1.2)",
                    ["moe.MoE.update_bias"]),
    "balance-loss": ("the complementary sequence-wise balance loss Σ f_i P_i (report §2.1.2)",
                     ["moe.sequence_balance_loss"]),
    "mtp-loss": ("MTP's shifted inputs and its loss (λ/D) Σ_k CE_k (report §2.2)",
                 ["mtp.mtp_hidden", "mtp.mtp_loss"]),
    "speculative": ("speculative acceptance: greedy, and min(1, p/q) with the residual resample (report §2.2)",
                    ["generate.probs_from_logits", "generate.verify_draft"]),
    "fp8-quant": ("FP8 quantization: 1×128 activation tiles and 128×128 weight blocks (report §3.3.2)",
                  ["fp8.quantize_act_ref", "fp8.quantize_weight_ref"]),
    "fp8-gemm": ("the reference FP8 GEMM with FP32 promotion every 128 along K (report §3.3.2)",
                 ["fp8.fp8_gemm_ref"]),
    "dualpipe": ("pipeline schedules: 1F1B, then DualPipe's eight steps (report §3.2.1)",
                 ["dualpipe.schedule_1f1b", "dualpipe.step_counts", "dualpipe._eight_steps"]),
}


class ExerciseError(ValueError):
    """Bad input to make/grade (unknown set or function, DIR exists, not a student copy)."""


# ---------------------------------------------------------------------------------------------------------
# Locating and stubbing a function
# ---------------------------------------------------------------------------------------------------------
def split_name(name: str) -> tuple:
    """"mla.MLA._attend_absorb" → ("mla.py", "MLA._attend_absorb")."""
    module, _, qualname = name.partition(".")
    if not module or not qualname:
        raise ExerciseError(f"function {name!r} is not of the form module.Qualified.name (e.g. moe.route)")
    return module + ".py", qualname


def find_function(tree: ast.Module, qualname: str):
    """The FunctionDef of `qualname` ("f", "Class.f", "Outer.Inner.f") among the module's top-level statements."""
    body, node = tree.body, None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _label(stmt: ast.stmt, src: str) -> str:
    """What a skeleton line says of the statement that a trailing comment belongs to: `name = ...`, `return ...`."""
    def seg(node):
        return ast.get_source_segment(src, node) or "..."

    if isinstance(stmt, ast.Assign):
        return " = ".join(seg(t) for t in stmt.targets) + " = ..."
    if isinstance(stmt, ast.AugAssign):
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}.get(type(stmt.op), "")
        return f"{seg(stmt.target)} {op}= ..."
    if isinstance(stmt, ast.AnnAssign):
        return f"{seg(stmt.target)} = ..."
    if isinstance(stmt, ast.Return):
        return "return ..."
    if isinstance(stmt, ast.For):
        return f"for {seg(stmt.target)} in ...:"
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"def {stmt.name}(...):"
    if isinstance(stmt, ast.If) and seg(stmt).startswith("elif"):
        return "elif ...:"  # an elif is an If nested in the orelse of the one above, starting at its keyword
    if isinstance(stmt, (ast.If, ast.While, ast.With)):
        return {ast.If: "if ...:", ast.While: "while ...:", ast.With: "with ...:"}[type(stmt)]
    return "..."


def _lines(src: str) -> list:
    """Source lines as ast numbers them (str.splitlines would also split at form feeds and \u2028)."""
    return io.StringIO(src, newline="").readlines()


_BLOCKS = (ast.For, ast.While, ast.With, ast.If, ast.FunctionDef, ast.AsyncFunctionDef)


def stub_source(src: str, qualname: str, name: str) -> str:
    """`src` with the body of `qualname` replaced by its comment skeleton and `raise NotImplementedError`."""
    tree = ast.parse(src)
    fn = find_function(tree, qualname)
    if fn is None:
        raise ExerciseError(f"{name}: no function {qualname} in {name.partition('.')[0]}.py")
    body = fn.body
    has_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
               and isinstance(body[0].value.value, str))
    code = body[1:] if has_doc else body
    indent = " " * body[0].col_offset
    if body[0].lineno == fn.lineno:
        raise ExerciseError(f"{name}: a one-line function cannot be stubbed")
    first = body[0].end_lineno + 1 if has_doc else body[0].lineno  # 1-based, first line replaced
    last = code[-1].end_lineno if code else first - 1               # 1-based, last line replaced
    lines = _lines(src)
    starts = {}  # line → the innermost statement starting there
    for stmt in code:
        for node in ast.walk(stmt):
            if isinstance(node, ast.stmt):
                starts[node.lineno] = node
    comments = {}  # line → the comment text (first comment token on the line)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and first <= tok.start[0] <= last:
            comments.setdefault(tok.start[0], (tok.start[1], tok.string))
    blocks = [n for n in starts.values() if isinstance(n, _BLOCKS)]
    skeleton, shown = [], set()
    for line in range(first, last + 1):
        if line not in comments:
            continue
        # the headers of the blocks around this line (a loop, a nested def), once each, outermost first
        for b in sorted((b for b in blocks if b.lineno < line <= b.end_lineno), key=lambda b: b.lineno):
            if b.lineno not in shown and b.lineno not in comments:
                skeleton.append(f"{' ' * b.col_offset}# {_label(b, src)}\n")
            shown.add(b.lineno)
        shown.add(line)
        col, text = comments[line]
        own = lines[line - 1]
        lead = len(own) - len(own.lstrip())
        pad = " " * max(lead, len(indent))
        if own[:col].strip() == "":        # a full-line comment: kept as it is
            skeleton.append(pad + text + "\n")
        elif line in starts:               # a trailing comment: the statement's target, then the comment
            skeleton.append(f"{pad}# {_label(starts[line], src)}  {text}\n")
        elif re.match(r"else\s*:", own.lstrip()):  # an if's else branch (no statement starts on its line)
            skeleton.append(f"{' ' * lead}# else:  {text}\n")
        else:                              # a comment on a continuation line of the statement above
            around = [n for n in starts.values() if n.lineno < line <= n.end_lineno]
            col = max(around, key=lambda n: n.lineno).col_offset if around else len(indent)
            skeleton.append(f"{' ' * col}#     ...  {text}\n")
    stub = skeleton + [f'{indent}raise NotImplementedError("{STUB_PREFIX}{name}")\n']
    return "".join(lines[: first - 1] + stub + lines[last:])


def function_source(src: str, qualname: str) -> str:
    """The full text of `qualname` in `src` (decorators included), to restore a solution or plant a mistake."""
    fn = find_function(ast.parse(src), qualname)
    if fn is None:
        raise ExerciseError(f"no function {qualname}")
    start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    return "".join(_lines(src)[start - 1: fn.end_lineno])


def replace_function(src: str, qualname: str, new_text: str) -> str:
    """`src` with the whole definition of `qualname` replaced by `new_text` (as function_source returns it)."""
    fn = find_function(ast.parse(src), qualname)
    if fn is None:
        raise ExerciseError(f"no function {qualname}")
    start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    lines = _lines(src)
    return "".join(lines[: start - 1]) + new_text + "".join(lines[fn.end_lineno:])


def is_stub(src: str, qualname: str) -> bool:
    """Whether `qualname`'s body is still only the exercise's NotImplementedError (comments aside)."""
    fn = find_function(ast.parse(src), qualname)
    if fn is None:
        return False
    code = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return (len(code) == 1 and isinstance(code[0], ast.Raise) and STUB_PREFIX in ast.unparse(code[0]))


# ---------------------------------------------------------------------------------------------------------
# Sets, grading tests, the student copy
# ---------------------------------------------------------------------------------------------------------
def grading_tests(root: str) -> dict:
    """function → ["tests/grading/test_x.py::test_y", ...], from the @pytest.mark.grades(...) markers (read by ast)."""
    found = {}
    folder = os.path.join(root, GRADING_DIR)
    for fname in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not (fname.startswith("test_") and fname.endswith(".py")):
            continue
        rel = f"{GRADING_DIR}/{fname}".replace(os.sep, "/")
        with open(os.path.join(folder, fname), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test")):
                continue
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith("mark.grades") and dec.args
                        and isinstance(dec.args[0], ast.Constant)):
                    found.setdefault(dec.args[0].value, []).append(f"{rel}::{node.name}")
    return found


def resolve(sets=(), functions=()) -> list:
    """The functions of the named sets, then the named functions, in order, without repeats."""
    out = []
    for s in sets:
        if s not in SETS:
            raise ExerciseError(f"unknown set {s!r}; choose from {', '.join(SETS)}")
        out += SETS[s][1]
    for name in functions:
        split_name(name)
        out.append(name)
    return list(dict.fromkeys(out))


def check_functions(root: str, names: list) -> dict:
    """Every name must be a function that can be stubbed and that has grading tests; returns the tests of each."""
    tests = grading_tests(root)
    for name in names:
        path, qualname = split_name(name)
        full = os.path.join(root, path)
        if not os.path.isfile(full):
            raise ExerciseError(f"{name}: no file {path}")
        with open(full, encoding="utf-8") as f:
            stub_source(f.read(), qualname, name)
        if name not in tests:
            raise ExerciseError(f"{name}: no grading test is marked @pytest.mark.grades({name!r}) in {GRADING_DIR}")
    return {n: tests[n] for n in names}


_TEXT_EXT = (".py", ".cu", ".md", ".toml", ".txt", ".cfg", ".json", ".yml", ".yaml")


def repository_files(root: str) -> list:
    """Relative paths to copy: git's tracked and untracked-not-ignored files, or, outside git, text and test files."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        files = [p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for d, dirs, names in os.walk(root):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
            files += [os.path.relpath(os.path.join(d, n), root) for n in names if n.endswith(_TEXT_EXT)]
    copies = [p[: -len(MANIFEST)] for p in files if p.endswith("/" + MANIFEST)]  # student copies made in here
    return sorted(p for p in files if os.path.isfile(os.path.join(root, p)) and p != MANIFEST
                  and not any(p.startswith(c) for c in copies))


def make(out: str, names: list, root: str = ROOT) -> dict:
    """Write the student copy of `root` to `out` with `names` stubbed; returns {function: [tests]}."""
    if not names:
        raise ExerciseError("nothing to assign: give --set NAME or --function module.name (see: exercises.py list)")
    if not out:
        raise ExerciseError("--out is empty; give a new directory for the student copy")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExerciseError(f"{out} exists; give a new directory for the student copy")
    tests = check_functions(root, names)
    # the repository's own tests stay behind: they hold the answers (the planted mistakes' correct lines, vectorized
    # forms of the exercises); the copy keeps the grading tests and what they import
    files = [p for p in repository_files(root) if not re.fullmatch(r"tests/test_\w+\.py", p)]
    existed = os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ExerciseError(f"cannot make {out} ({e.strerror or e})") from None
    try:
        _write_copy(out, root, files, names, tests)
    except BaseException as e:  # a full disk, Ctrl-C: no half-made copy is left (an empty folder given stays, empty)
        shutil.rmtree(out, ignore_errors=True)
        if existed:
            with contextlib.suppress(OSError):
                os.mkdir(out)
        if isinstance(e, OSError):
            raise ExerciseError(f"cannot write the student copy to {out} ({e.strerror or e})") from None
        raise
    return tests


def _write_copy(out: str, root: str, files: list, names: list, tests: dict) -> None:
    """make's writing: the files, the stubs, exercises.json and EXERCISES.md."""
    for rel in files:
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        shutil.copy2(os.path.join(root, rel), dst)
    by_file = {}
    for name in names:
        by_file.setdefault(split_name(name)[0], []).append(name)
    for path, fns in by_file.items():
        with open(os.path.join(out, path), encoding="utf-8") as f:
            src = f.read()
        for name in fns:
            src = stub_source(src, split_name(name)[1], name)
        with open(os.path.join(out, path), "w", encoding="utf-8") as f:
            f.write(src)
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"functions": tests}, f, indent=1)
    with open(os.path.join(out, "EXERCISES.md"), "w", encoding="utf-8") as f:
        f.write(exercises_md(tests))


def exercises_md(tests: dict) -> str:
    lines = ["# Exercises", "",
             "Implement each function below where its body now raises `NotImplementedError`: the docstring says what",
             "it computes, the comments left in the body are a skeleton (shapes, steps). Grade your work with",
             "", "    python exercises.py grade", "",
             "which runs the tests listed here and prints, per function, passed / failed / not started.", ""]
    for name, ts in tests.items():
        path, qualname = split_name(name)
        lines += [f"## `{qualname}` in `{path}`", ""] + [f"- `{t}`" for t in ts] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------------------
class Recorder:
    """pytest plugin: keeps the grading tests of the chosen functions and records each test's outcome."""

    def __init__(self, functions, per_test: float = 0):
        self.functions = set(functions)
        self.per_test = per_test  # seconds a test may take (0: no limit), so that one endless loop costs one test
        self.results = {}   # nodeid → dict(function, outcome, where, error, stub)
        self.broken = {}    # test file → collection error
        if per_test:
            signal.signal(signal.SIGALRM, self._too_long)

    def _too_long(self, *_):
        raise TimeoutError(f"took longer than {self.per_test:g} s (an endless loop?)")

    def pytest_runtest_setup(self, item):
        if self.per_test:
            signal.setitimer(signal.ITIMER_REAL, self.per_test)

    def pytest_runtest_teardown(self, item):
        if self.per_test:
            signal.setitimer(signal.ITIMER_REAL, 0)

    @staticmethod
    def _graded(item):
        mark = item.get_closest_marker("grades")
        return mark.args[0] if mark and mark.args else None

    def pytest_collection_modifyitems(self, config, items):
        keep = [it for it in items if self._graded(it) in self.functions]
        drop = [it for it in items if self._graded(it) not in self.functions]
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def pytest_collectreport(self, report):
        """A grading test file that cannot be imported (a syntax error in an exercise, say): where and why."""
        if not report.failed:
            return
        text = str(report.longrepr).strip().splitlines()
        errs = [ln[1:].strip() for ln in text if ln.startswith("E ")]
        where = ""
        for ln in text:  # the deepest frame in the student's own files, or the file a SyntaxError names
            m = re.match(r'^E?\s*File "(.+)", line (\d+)', ln) or re.match(r"^(\S+\.py):(\d+): in ", ln)
            if m and os.path.abspath(m.group(1)).startswith(os.getcwd() + os.sep):
                where = f"{os.path.relpath(m.group(1))}:{m.group(2)}: "
        why = errs[-1] if errs else (text[-1] if text else "")
        self.broken[report.nodeid.replace(os.sep, "/")] = where + why

    def pytest_runtest_makereport(self, item, call):
        name = self._graded(item)
        res = self.results.setdefault(item.nodeid, dict(function=name, outcome="passed"))
        if call.excinfo is None or res["outcome"] != "passed":
            return None
        exc = call.excinfo
        if type(exc.value).__name__ in ("Skipped", "XFailed"):  # pytest.skip / pytest.xfail
            res["outcome"] = "skipped"
            return None
        res["outcome"] = "failed"
        msg = str(exc.value).strip().splitlines()
        res["error"] = f"{exc.typename}: {msg[0] if msg else ''}".rstrip(": ")
        size = [ln.strip() for ln in msg[1:] if ln.strip().startswith(("Greatest absolute difference",
                                                                          "Absolute difference"))]
        if size:  # torch.testing.assert_close: how far off, not only that it is
            res["error"] += f" ({size[0]})"
        if exc.errisinstance(NotImplementedError) and msg and msg[0].startswith(STUB_PREFIX):
            res["stub"] = msg[0][len(STUB_PREFIX):]
        test_file = os.path.abspath(str(item.path))
        mine = [e for e in exc.traceback if os.path.abspath(str(e.path)).startswith(os.getcwd() + os.sep)
                and os.path.abspath(str(e.path)) != test_file]
        if mine and not res.get("stub"):  # raised inside the student's code: say where
            res["error"] += f" (at {os.path.relpath(str(mine[-1].path))}:{mine[-1].lineno + 1})"
        for entry in reversed(exc.traceback):
            if os.path.abspath(str(entry.path)) == test_file:
                stmt = str(entry.statement).strip().splitlines()
                rel = os.path.relpath(test_file).replace(os.sep, "/")
                case = f" [{item.callspec.id}]" if hasattr(item, "callspec") else ""  # which parameters failed
                res["where"] = f"{rel}:{entry.lineno + 1}{case}: {stmt[0] if stmt else ''}"
                break
        return None


def _run_pytest(out_json: str, functions: list, per_test: float, files: list) -> int:
    """In the grading subprocess (cwd = the student copy): run pytest on `files`, write the outcomes as JSON."""
    import pytest
    rec = Recorder(functions, per_test)
    args = ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-o", "addopts=",
            "--rootdir", os.getcwd(), *files]
    rc = pytest.main(args, plugins=[rec])
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump({"results": rec.results, "broken": rec.broken, "rc": int(rc)}, f)
    return 0


def summarize(tests: dict, outcome: dict) -> dict:
    """Per function: (status, detail), status in passed / failed / not started / skipped / missing."""
    per, by_test = {}, {}
    for nodeid, r in outcome["results"].items():  # "file::test[params]" → "file::test"
        by_test.setdefault(nodeid.split("[")[0], []).append(r)
    for name, ts in tests.items():
        rs = [r for t in ts for r in by_test.get(t, [])]
        broken = [f"{t.split('::')[0]}: {outcome['broken'][t.split('::')[0]]}" for t in ts
                  if t.split("::")[0] in outcome["broken"]]
        if broken and not rs:
            per[name] = ("failed", f"the code does not import ({broken[0].split(': ', 1)[1]})")
        elif not rs:
            per[name] = ("missing", "its grading tests did not run")
        elif any(r.get("stub") == name for r in rs):
            per[name] = ("not started", "")
        elif all(r["outcome"] == "skipped" for r in rs):
            per[name] = ("skipped", "")
        elif any(r["outcome"] == "failed" for r in rs):
            r = next(r for r in rs if r["outcome"] == "failed")
            if r.get("stub"):
                per[name] = ("failed", f"needs {r['stub']} (not started); the grading test should replace it")
            else:
                n_fail = sum(r["outcome"] == "failed" for r in rs)
                detail = f"{n_fail} of {len(rs)} tests\n    {r.get('where', '?')}\n    {r.get('error', '')}"
                per[name] = ("failed", detail)
        else:
            per[name] = ("passed", f"{len(rs)} tests")
    return per


def grade(student_dir: str, sets=(), functions=(), verbose=False, timeout=900, per_test=60.0) -> dict:
    """Grade the student copy in `student_dir`; returns {function: (status, detail)} in the manifest's order.
    per_test: seconds one grading test may take (an endless loop fails that test, not the whole run); timeout: the
    whole run's limit. Run from another copy of the repository (the instructor's), the copy's grading tests must be
    that repository's own, byte for byte."""
    manifest = os.path.join(student_dir, MANIFEST)
    if not os.path.isfile(manifest):
        raise ExerciseError(f"{student_dir} is not a student copy (no {MANIFEST}; make one with exercises.py make)")
    try:
        with open(manifest, encoding="utf-8") as f:
            tests = json.load(f)["functions"]
        if not isinstance(tests, dict):
            raise TypeError("'functions' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise ExerciseError(f"{manifest} is damaged ({type(e).__name__}: {e}); make the student copy again") from None
    if not tests:
        raise ExerciseError(f"{manifest} lists no function to grade; make the student copy again")
    if sets or functions:
        chosen = resolve(sets, functions)
        unknown = [n for n in chosen if n not in tests]
        if unknown:
            raise ExerciseError(f"{unknown[0]} is not an exercise of this copy; it has: {', '.join(tests)}")
        tests = {n: tests[n] for n in chosen}
    files = sorted({t.split("::")[0] for ts in tests.values() for t in ts})
    if os.path.realpath(student_dir) != os.path.realpath(ROOT):  # an instructor grading a copy handed in
        for rel in files + [os.path.join("tests", "conftest.py")]:
            if _bytes(os.path.join(student_dir, rel)) != _bytes(os.path.join(ROOT, rel)):
                raise ExerciseError(f"{os.path.join(student_dir, rel)} is not this repository's {rel} (edited, or made "
                                    f"from another version); grading uses the grading tests as they were made")
    fd, out_json = tempfile.mkstemp(suffix=".json", prefix="grade-")
    os.close(fd)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "_pytest", out_json, ",".join(tests), str(per_test), *files]
    try:
        proc = subprocess.run(cmd, cwd=student_dir, env=env, capture_output=not verbose, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExerciseError(f"grading took longer than {timeout} s (an endless loop in an exercise?)") from None
    try:
        with open(out_json, encoding="utf-8") as f:
            outcome = json.load(f) if proc.returncode == 0 else None
    except ValueError:  # empty: the run ended before writing
        outcome = None
    finally:
        os.remove(out_json)
    if outcome is None:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] if not verbose else []
        raise ExerciseError(f"the grading run did not finish ({' '.join(tail) or 'no output'})")
    return summarize(tests, outcome)


def _bytes(path: str):
    """A file's bytes, or None if it is missing."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def report(per: dict) -> str:
    width = max(len(n) for n in per) if per else 0
    lines = []
    for name, (status, detail) in per.items():
        first, *rest = (detail or "").split("\n")
        lines.append(f"{name:<{width}}  {status:<11}  {first}".rstrip())
        lines += rest
    counts = {s: sum(v[0] == s for v in per.values()) for s in ("passed", "failed", "not started", "skipped",
                                                                 "missing")}
    tail = [f"{counts[s]} {s}" for s in ("skipped", "missing") if counts[s]]  # neither is a pass: grade exits 1
    lines.append(", ".join([f"{counts['passed']} of {len(per)} passed", f"{counts['failed']} failed",
                            f"{counts['not started']} not started", *tail]))
    return "\n".join(lines)


def list_text(root: str = ROOT) -> str:
    tests = grading_tests(root)
    lines = ["Sets (in the suggested order of assignments):", ""]
    for name, (about, fns) in SETS.items():
        lines += textwrap.wrap(f"{name}: {about}", 100, subsequent_indent="  ")  # a 100-column terminal
        lines += [f"    {fn}  (test functions: {len(tests.get(fn, []))})" for fn in fns]
    lines += ["", "Other functions with grading tests (--function NAME):"]
    listed = {fn for _, fns in SETS.values() for fn in fns}
    lines += [f"    {fn}" for fn in tests if fn not in listed] or ["    (none)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_pytest"]:  # the grading subprocess: the student copy's modules come first on sys.path
        sys.path[0] = os.getcwd()
        return _run_pytest(argv[1], argv[2].split(","), float(argv[3]), argv[4:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="show the ready-made sets and their functions")
    m = sub.add_parser("make", help="instructor: write a student copy with the chosen functions stubbed")
    m.add_argument("--out", required=True, help="new directory for the student copy")
    g = sub.add_parser("grade", help="learner: run the grading tests of a student copy")
    g.add_argument("dir", nargs="?", default=".", help="the student copy (default: the current directory)")
    g.add_argument("-v", "--verbose", action="store_true", help="show pytest's own output too")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one grading test may take before it fails as an endless loop (default: 60)")
    for q in (m, g):
        q.add_argument("--set", action="append", default=[], metavar="NAME", help="a ready-made set (repeatable)")
        q.add_argument("--function", action="append", default=[], metavar="module.Qualified.name",
                       help="one function (repeatable)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            print(list_text())
        elif args.cmd == "make":
            tests = make(args.out, resolve(args.set, args.function))
            print(f"wrote {args.out}: functions to implement: {len(tests)}, listed with their tests in "
                  f"{os.path.join(args.out, 'EXERCISES.md')}; grade them inside it with: python exercises.py grade")
        else:
            if not args.timeout > 0:
                raise ExerciseError(f"--timeout must be > 0 seconds, got {args.timeout}")
            per = grade(args.dir, args.set, args.function, args.verbose, per_test=args.timeout)
            print(report(per))
            return 0 if all(s == "passed" for s, _ in per.values()) else 1
    except ExerciseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`list | head`): stop quietly, also at Python's exit flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
