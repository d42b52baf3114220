"""exercises.py: the exercise table stays in step with the code, stubs keep what a learner needs, make/grade work."""
import ast
import json
import os
import subprocess
import sys

import pytest

import exercises as E

ROOT = E.ROOT
ALL = [fn for _, fns in E.SETS.values() for fn in fns]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# -- the table ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_every_listed_function_exists_is_stubbed_and_graded(name):
    """A renamed or moved function fails here, naming itself."""
    path, qualname = E.split_name(name)
    src = read(os.path.join(ROOT, path))
    original = E.find_function(ast.parse(src), qualname)
    assert original is not None, f"{name} is listed in exercises.SETS but {path} has no {qualname}"
    stubbed = E.stub_source(src, qualname, name)
    compile(stubbed, path, "exec")
    assert E.is_stub(stubbed, qualname) and not E.is_stub(src, qualname)
    fn = E.find_function(ast.parse(stubbed), qualname)
    assert ast.dump(fn.args) == ast.dump(original.args), "the signature is kept"
    assert ast.get_docstring(fn) == ast.get_docstring(original), "the docstring is kept"
    assert [ast.dump(d) for d in fn.decorator_list] == [ast.dump(d) for d in original.decorator_list]
    rest = lambda s: s.replace(E.function_source(s, qualname), "")  # noqa: E731  everything else is untouched
    assert rest(stubbed) == rest(src)
    assert E.grading_tests(ROOT).get(name), f"{name} has no test marked @pytest.mark.grades({name!r})"


def test_every_grading_test_names_a_listed_function():
    graded = E.grading_tests(ROOT)
    assert graded, "no grading tests found"
    assert sorted(set(graded) - set(ALL)) == [], "grading tests of functions that no set lists"
    assert len(E.SETS) == 11 and len(set(ALL)) == len(ALL)


def test_stub_keeps_the_comment_skeleton():
    stubbed = E.function_source(E.stub_source(read(os.path.join(ROOT, "mla.py")), "MLA._attend_absorb",
                                              "mla.MLA._attend_absorb"), "MLA._attend_absorb")
    assert "# q_lat = ...  # (B, T, H, c): W^UK_i^T q^C_i" in stubbed
    assert "# w_uk, w_uv = ...  # (H, dn, c), (H, dv, c)" in stubbed
    assert "        # if ...:  # per-sequence positions" in stubbed  # the if, then its elif as an elif
    assert "        # elif ...:  # a single query is the newest position" in stubbed
    assert 'raise NotImplementedError("exercise: mla.MLA._attend_absorb")' in stubbed
    assert "einsum" not in stubbed, "no code of the solution is left"


def test_stub_keeps_if_elif_else_apart():
    """An elif is an If of its own in the syntax tree: shown as elif, from a comment on it or on its body; a name
    that starts with "else" stays a name."""
    src = '''def f(x):
    """Doc."""
    if x:  # a
        y = 1
    elif x > 1:  # b
        y = 2
    elif x > 2:
        y = 3  # body comment
    else:  # c
        y = 4
    elsewhere = y  # the result
    return elsewhere
'''
    assert E.stub_source(src, "f", "m.f") == '''def f(x):
    """Doc."""
    # if ...:  # a
    # elif ...:  # b
    # elif ...:
        # y = ...  # body comment
    # else:  # c
    # elsewhere = ...  # the result
    raise NotImplementedError("exercise: m.f")
'''


def test_stub_nested_class_method_and_loops():
    src = '''class Outer:
    class Inner:
        @staticmethod
        def f(x, y=2):
            """Doc."""
            # the plan
            for i in range(3):
                x = x + i  # (N,) running sum
            z = [x,
                 y]  # a list
            return z  # (2,)

    def f(self):
        return 1
'''
    out = E.stub_source(src, "Outer.Inner.f", "m.Outer.Inner.f")
    assert out == '''class Outer:
    class Inner:
        @staticmethod
        def f(x, y=2):
            """Doc."""
            # the plan
            # for i in ...:
                # x = ...  # (N,) running sum
            #     ...  # a list
            # return ...  # (2,)
            raise NotImplementedError("exercise: m.Outer.Inner.f")

    def f(self):
        return 1
'''
    ns = {}
    exec(compile(out, "m.py", "exec"), ns)
    with pytest.raises(NotImplementedError, match="exercise: m.Outer.Inner.f"):
        ns["Outer"].Inner.f(1)
    assert ns["Outer"]().f() == 1
    with pytest.raises(E.ExerciseError, match="no function"):
        E.stub_source(src, "Outer.g", "m.Outer.g")
    with pytest.raises(E.ExerciseError, match="one-line"):
        E.stub_source("def g(): return 1\n", "g", "m.g")


# -- make, and bad input -----------------------------------------------------------------------------------------
def test_make_writes_a_student_copy(tmp_path):
    out = tmp_path / "student"
    assert E.main(["make", "--out", str(out), "--set", "routing", "--function", "fp8.fp8_gemm_ref"]) == 0
    manifest = json.loads(read(out / E.MANIFEST))["functions"]
    assert list(manifest) == ["moe.limit_groups", "moe.route", "fp8.fp8_gemm_ref"]
    assert all(t.startswith("tests/grading/test_grade_") for ts in manifest.values() for t in ts)
    moe_src = read(out / "moe.py")
    assert E.is_stub(moe_src, "route") and E.is_stub(moe_src, "limit_groups")
    assert not E.is_stub(moe_src, "sequence_balance_loss")
    assert E.is_stub(read(out / "fp8.py"), "fp8_gemm_ref")
    assert read(out / "mla.py") == read(os.path.join(ROOT, "mla.py"))
    assert (out / "exercises.py").is_file() and (out / "tests" / "grading" / "test_grade_moe.py").is_file()
    # the repository's own tests are not handed out: they hold the answers (test_exercises.py's planted mistakes
    # quote every correct line); the grading tests and their conftest are
    assert (out / "tests" / "conftest.py").is_file() and not list((out / "tests").glob("test_*.py"))
    assert "`route` in `moe.py`" in read(out / "EXERCISES.md")


@pytest.mark.parametrize("argv, message", [
    (["make", "--out", "{tmp}/new", "--set", "nope"], "unknown set 'nope'"),
    (["make", "--out", "{tmp}/new", "--function", "moe.no_such"], "no function no_such in moe.py"),
    (["make", "--out", "{tmp}/new", "--function", "nomodule.f"], "no file nomodule.py"),
    (["make", "--out", "{tmp}/new", "--function", "route"], "not of the form module.Qualified.name"),
    (["make", "--out", "{tmp}/new"], "nothing to assign"),
    (["make", "--out", "{tmp}/full", "--set", "routing"], "exists"),
    (["make", "--out", "{tmp}/full/x.txt", "--set", "routing"], "exists"),  # a file
    (["grade", "{tmp}/full"], "is not a student copy"),
    (["grade", "{tmp}/copy", "--function", "moe.route"], "is not an exercise of this copy"),
    (["grade", "{tmp}/copy", "--set", "nope"], "unknown set 'nope'"),
    (["make", "--out", "", "--set", "routing"], "--out is empty"),
    (["make", "--out", "{tmp}/full/x.txt/new", "--set", "routing"], "cannot make"),  # its parent is a file
    (["grade", "{tmp}/cut"], "exercises.json is damaged (JSONDecodeError"),
    (["grade", "{tmp}/empty"], "exercises.json is damaged (KeyError"),
    (["grade", "{tmp}/nothing"], "exercises.json lists no function to grade"),
    (["grade", "{tmp}/copy", "--timeout", "0"], "--timeout must be > 0 seconds"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    (tmp_path / "copy").mkdir()
    write(tmp_path / "copy" / E.MANIFEST, json.dumps({"functions": {"moe.limit_groups": []}}))
    for name, text in (("cut", '{"functions": '), ("empty", "{}"), ("nothing", '{"functions": {}}')):  # damaged
        (tmp_path / name).mkdir()
        write(tmp_path / name / E.MANIFEST, text)
    assert E.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_make_that_fails_part_way_leaves_no_half_copy(tmp_path, capsys, monkeypatch, error):
    """A write that fails while the copy is made (a full disk: one line) or Ctrl-C leaves no half-made folder."""
    real, n = E.shutil.copy2, []

    def copy2(src, dst, **kw):
        n.append(1)
        if len(n) == 5:
            raise error
        return real(src, dst, **kw)

    monkeypatch.setattr(E.shutil, "copy2", copy2)
    if isinstance(error, OSError):
        assert E.main(["make", "--out", str(tmp_path / "new"), "--set", "routing"]) == 2
        want = f"error: cannot write the student copy to {tmp_path / 'new'} (No space left on device)\n"
        assert capsys.readouterr().err == want
    else:
        with pytest.raises(KeyboardInterrupt):
            E.main(["make", "--out", str(tmp_path / "new"), "--set", "routing"])
    assert not (tmp_path / "new").exists()


def test_list_shows_every_set(capsys):
    assert E.main(["list"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in E.SETS) and all(fn in text for fn in ALL)
    assert max(len(line) for line in text.splitlines()) <= 100  # a 100-column terminal


# -- grading a student copy ------------------------------------------------------------------------------------------
def restore(copy, name, mistake=None):
    """Put the solution of `name` back into the student copy; `mistake` = (text, replacement) plants an error."""
    path, qualname = E.split_name(name)
    solution = E.function_source(read(os.path.join(ROOT, path)), qualname)
    if mistake:
        assert mistake[0] in solution, f"cannot plant the mistake: {mistake[0]!r} is not in {name}"
        solution = solution.replace(*mistake)
    write(copy / path, E.replace_function(read(copy / path), qualname, solution))


@pytest.mark.slow
def test_grade_turns_from_not_started_to_passed_and_catches_a_mistake(tmp_path):
    copy = tmp_path / "student"
    E.make(str(copy), ["moe.route", "moe.sequence_balance_loss"])
    per = E.grade(str(copy))
    assert per == {"moe.route": ("not started", ""), "moe.sequence_balance_loss": ("not started", "")}

    restore(copy, "moe.route")
    # a plausible mistake: the balance loss's P_i from the raw scores instead of the normalised s'_{i,t}
    restore(copy, "moe.sequence_balance_loss",
            mistake=("(scores / scores.sum(-1, keepdim=True)).mean(1)", "scores.mean(1)"))
    per = E.grade(str(copy))
    assert per["moe.route"][0] == "passed"
    status, detail = per["moe.sequence_balance_loss"]
    assert status == "failed" and "tests/grading/test_grade_moe.py:" in detail and "Error" in detail
    assert "(Absolute difference: " in detail or "(Greatest absolute difference: " in detail  # how far off too

    restore(copy, "moe.sequence_balance_loss")
    per = E.grade(str(copy), functions=["moe.sequence_balance_loss"])
    assert per == {"moe.sequence_balance_loss": ("passed", per["moe.sequence_balance_loss"][1])}


@pytest.mark.slow
def test_an_endless_loop_fails_its_test_alone_and_edited_grading_tests_are_refused(tmp_path):
    """One grading test may take --timeout seconds: an endless loop in one exercise fails that exercise, pointing at
    the loop, and the others are still graded. Graded from the repository, a copy whose grading tests were edited
    (a test turned into `return`, say) is refused rather than graded by them."""
    copy = tmp_path / "student"
    E.make(str(copy), ["moe.route", "moe.sequence_balance_loss"])
    restore(copy, "moe.route")
    line = "    B, T, K = indices.shape\n"
    restore(copy, "moe.sequence_balance_loss", mistake=(line, "    while True:\n        pass\n" + line))
    per = E.grade(str(copy), per_test=2)
    assert per["moe.route"][0] == "passed"
    status, detail = per["moe.sequence_balance_loss"]
    assert status == "failed" and "TimeoutError: took longer than 2 s (an endless loop?) (at moe.py:" in detail
    grading = copy / "tests" / "grading" / "test_grade_moe.py"
    write(grading, read(grading) + "\n")
    with pytest.raises(E.ExerciseError, match="test_grade_moe.py is not this repository's tests/grading/"):
        E.grade(str(copy))


@pytest.mark.slow
def test_each_grade_is_independent_of_the_other_exercises(tmp_path):
    """With every exercise stubbed, restore every other one: those pass while their neighbours are stubs (route
    while limit_groups is one, rope_frequencies while yarn_correction_range is, ...), the rest stay not started.
    Then the other half. A test that leaned on another exercise would fail here."""
    for half in (0, 1):
        copy = tmp_path / f"student{half}"
        E.make(str(copy), ALL)
        done = ALL[half::2]
        for name in done:
            restore(copy, name)
        per = E.grade(str(copy))
        assert {n for n, (s, _) in per.items() if s == "passed"} == set(done), per
        assert {n for n, (s, _) in per.items() if s == "not started"} == set(ALL) - set(done), per


# One plausible mistake per exercise: (function, text of the solution, what the mistake writes instead).
PLANTS = [
    ("mla.yarn_correction_range", "low = max(math.floor(", "low = max(math.ceil("),
    ("mla.rope_frequencies", "freqs * (1 - ramp) + freqs / cfg.rope_factor * ramp",
     "freqs * ramp + freqs / cfg.rope_factor * (1 - ramp)"),  # the YaRN ramp reversed
    ("mla.apply_rotary_emb", "unflatten(-1, (-1, 2))", "unflatten(-1, (2, -1)).transpose(-1, -2)"),  # halves, not pairs
    ("mla.softmax_scale", "scale *= m * m", "scale *= m"),
    ("mla.MLA._attend_absorb", "if T > 1:", "if False:"),  # no causal mask
    ("mla_decode.latent_attention_split", "acc = acc * alpha[..., None] + p @ kv[:, s]",
     "acc = acc + p @ kv[:, s]"),  # the accumulator not rescaled when the running max grows
    ("moe.limit_groups", 'float("-inf")', "0.0"),  # the dropped groups filled with 0
    ("moe.route", "weights = weights / weights.sum(-1, keepdim=True)", "pass"),  # no renormalization
    ("moe.MoE.update_bias", "torch.sign(load.mean() - load)", "torch.sign(load - load.mean())"),
    ("moe.sequence_balance_loss", "n_experts / (K * T)", "n_experts / T"),
    ("mtp.mtp_hidden", "emb = embed(idx[:, k:])", "emb = embed(idx[:, k - 1:-1])"),  # embedding one too early
    ("mtp.mtp_loss", "tk = targets[:, k:]", "tk = targets[:, k - 1:-1]"),  # targets one too early
    ("generate.probs_from_logits", "logits < kth", "logits <= kth"),  # top-k drops the k-th
    ("generate.verify_draft", "residual = (p - q).clamp_min(0)", "residual = p.clone()"),  # resample from p
    ("fp8.quantize_act_ref", "* (1 / E4M3_MAX)", "* (1 / 240.0)"),  # E4M3's range taken for another format's
    ("fp8.quantize_weight_ref", ".clamp(min=AMAX_EPS)", ""),  # no amax floor: an all-zero block divides by 0
    ("fp8.fp8_gemm_ref", "sb[:, kb]", "sb[:, 0]"),  # one weight scale for every K block
    ("dualpipe.schedule_1f1b", "warm = min(n_ranks - 1 - r, n_chunks)", "warm = min(n_ranks - r, n_chunks)"),
    ("dualpipe.step_counts", "half - 2 * H + h + 1", "half - 2 * H + h + 2"),
    ("dualpipe._eight_steps", "ops += [W(), B(0, zb=True)]", "ops += [B(0, zb=True), W()]"),
]


def test_every_exercise_has_a_planted_mistake():
    assert sorted(p[0] for p in PLANTS) == sorted(ALL)


@pytest.mark.slow
def test_grading_catches_a_planted_mistake_in_every_exercise(tmp_path):
    """All mistakes planted at once in one copy: each function's grade fails on its own mistake alone."""
    copy = tmp_path / "student"
    E.make(str(copy), ALL)
    for name, old, new in PLANTS:
        restore(copy, name, mistake=(old, new))
    per = E.grade(str(copy))
    assert {n: s for n, (s, _) in per.items()} == {n: "failed" for n in ALL}, per
    assert not [n for n, (_, detail) in per.items() if "does not import" in detail or "needs " in detail], per


@pytest.mark.slow
def test_report_counts_every_status():
    """A function whose grading tests were all skipped (or did not run) is no pass: grade exits 1, and the summary
    line says why instead of adding up to fewer functions than it lists."""
    per = {"a.f": ("passed", "3 tests"), "a.g": ("skipped", ""), "a.h": ("missing", "its grading tests did not run"),
           "a.i": ("not started", "")}
    assert E.report(per).splitlines()[-1] == "1 of 4 passed, 0 failed, 1 not started, 1 skipped, 1 missing"
    assert E.report({"a.f": ("passed", "")}).splitlines()[-1] == "1 of 1 passed, 0 failed, 0 not started"


def test_list_into_a_closed_pipe_is_quiet():
    """`python exercises.py list | head`: once the reader is gone, no traceback and exit status 0."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "exercises.py"), "list"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    p.stdout.close()  # the reader goes away before the first line
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and err == ""
