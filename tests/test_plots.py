"""Tests of plots.py (text and PNG pictures, the loss curves of a log.jsonl) and of the demo commands."""
import json
import os
import subprocess
import sys

import pytest

import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_log(path, n=20, every=5):
    """A log.jsonl as train.py writes it: training records each step, evaluation records every `every`."""
    with open(path, "w") as f:
        for step in range(1, n + 1):
            f.write(json.dumps({"step": step, "lr": 1e-3, "loss": 9 - 0.1 * step, "main": 8 - 0.1 * step,
                                "mtp": 8.5 - 0.1 * step, "balance": 1.0, "grad_norm": 1.0, "tok_per_s": 1e3}) + "\n")
            if step % every == 0:
                f.write(json.dumps({"step": step, "val_main": 8.2 - 0.1 * step, "val_mtp": 8.6 - 0.1 * step,
                                    "val_mtp_acc": 0.1, "max_violation": 0.5}) + "\n")
    return path


def test_read_log_and_loss_series(tmp_path):
    train, evals = plots.read_log(write_log(tmp_path / "log.jsonl"))
    assert len(train) == 20 and len(evals) == 4
    series = {name: (xs, ys) for name, _, xs, ys in plots.loss_series(train, evals)}
    assert set(series) == {"train main", "val main", "val mtp"}
    assert series["val main"][0] == [5, 10, 15, 20]
    assert series["train main"][1][-1] == pytest.approx(6.0) and series["val mtp"][1][0] == pytest.approx(8.1)


def test_text_chart_puts_extremes_in_the_corners():
    lines = plots.text_chart([("a", "*", [0, 10], [1.0, 3.0]), ("b", "o", [5], [2.0])], width=11, height=5)
    grid = [line.split("|", 1)[1].ljust(11) for line in lines if "|" in line]
    assert len(grid) == 5
    assert grid[0][10] == "*" and grid[4][0] == "*" and grid[2][5] == "o"
    assert sum(row.count("*") + row.count("o") for row in grid) == 3
    assert lines[0].startswith("       3 |") and lines[4].startswith("       1 |")


def test_text_heatmap_shades_by_value():
    assert plots.text_heatmap([[0, 0.5, 1.0, 9.0]], ["x"], top=1.0) == ["x | " + plots.SHADES[5] + "@@|"]


def test_cli_prints_curves_and_last_values(tmp_path, capsys):
    plots.main([str(write_log(tmp_path / "log.jsonl"))])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "last: train main 6.0000 (step 20), val main 6.2000 (step 20), val mtp 6.6000 (step 20)" in out


def test_cli_takes_the_run_folder_too(tmp_path, capsys):
    plots.main([str(write_log(tmp_path / "log.jsonl"))])
    by_file = capsys.readouterr().out
    plots.main([str(tmp_path)])
    assert capsys.readouterr().out == by_file and "last: train main 6.0000" in by_file


def test_cli_into_a_closed_pipe_is_quiet(tmp_path, capsys, monkeypatch):
    """`plots.py log.jsonl | head`: once the reader is gone, no error line and exit status 0."""
    import io

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    log = write_log(tmp_path / "log.jsonl")
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    plots.main([str(log)])  # returns: no SystemExit(2)
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plots.main([str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2 and "no log file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(SystemExit):
        plots.main([str(bad)])
    assert "bad.jsonl:2: not a JSON object" in capsys.readouterr().err


def test_png_curves(tmp_path):
    pytest.importorskip("matplotlib")
    plots.main([str(write_log(tmp_path / "log.jsonl")), "--png", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_commands_run_and_stay_narrow(tmp_path):
    """Every concept file's demo as a learner runs it: exit 0, some output, no line over 100 characters."""
    log = write_log(tmp_path / "log.jsonl")
    for args in (["mla.py"], ["moe.py"], ["mtp.py"], ["fp8.py"], ["dualpipe.py"], ["plots.py", str(log)]):
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (args, r.stderr)
        lines = r.stdout.splitlines()
        assert len(lines) > 5 and max(map(len, lines)) <= 100, args


def test_cli_refuses_a_record_that_is_not_an_object(tmp_path, capsys):
    bad = tmp_path / "log.jsonl"
    bad.write_text('{"step": 1, "main": 2.0}\n7\n')  # a line that is JSON but no record
    with pytest.raises(SystemExit) as e:
        plots.main([str(bad)])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {bad}:2: a record needs a numeric 'step' field\n"


def test_cli_draws_training_records_without_main(tmp_path, capsys):
    """Training records that hold only the total loss are drawn with it."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in (1, 2, 3)))
    plots.main([str(log)])
    assert "last: train loss 2.0000 (step 3)" in capsys.readouterr().out


def test_cli_leaves_out_the_mtp_curve_of_a_model_without_mtp(tmp_path, capsys):
    """n_mtp = 0 logs val_mtp 0: no flat "val mtp" curve at 0 that would squash the others."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "main": 5.0 - s}) + "\n" + json.dumps(
        {"step": s, "val_main": 5.5 - s, "val_mtp": 0.0, "val_mtp_acc": 0.0, "max_violation": 0.1}) + "\n"
        for s in (1, 2, 3)))
    plots.main([str(log)])
    out = capsys.readouterr().out
    assert "val mtp" not in out and "last: train main 2.0000 (step 3), val main 2.5000 (step 3)" in out


@pytest.mark.parametrize("lines, message", [
    (['{"step": 1, "main": null}'], ":1: 'main' is not a number: None"),
    (['{"step": "x", "main": 1.0}'], ":1: a record needs a numeric 'step' field"),
    (['{"step": 1, "main": 2.0}', '{"step": 2, "val_main": "low"}'], ":2: 'val_main' is not a number: 'low'"),
    (['{"step": 1, "lr": 0.1}'], ": no loss records"),
    (['{"step": 1, "main": NaN}', '{"step": 2, "val_main": Infinity}'],
     ": no finite loss to draw (every loss is NaN or infinite: the run diverged)"),
    ([b'\xff\xfe binary'], ":1: not a JSON object: '\ufffd\ufffd binary'"),  # not UTF-8: the file and line named
])
def test_cli_odd_values_are_one_line(tmp_path, capsys, lines, message):
    log = tmp_path / "log.jsonl"
    if isinstance(lines[0], bytes):
        log.write_bytes(b"\n".join(lines) + b"\n")
    else:
        log.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        plots.main([str(log)])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {log}{message}\n"


def test_cli_draws_logs_whose_records_differ(tmp_path, capsys):
    """Hand-made or older logs: training records with "main" in some and only "loss" in others are drawn by the
    total loss (one quantity per curve); val_mtp in only some evaluations; a record of another kind is left out."""
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "main": 3.0, "loss": 3.5}, {"step": 2, "loss": 3.0}, {"step": 2, "lr": 0.1},
        {"step": 2, "val_main": 3.1, "val_mtp": 3.4}, {"step": 4, "val_main": 2.9}, {"step": 4, "loss": 2.5}]) + "\n")
    plots.main([str(log)])
    out = capsys.readouterr().out
    assert "last: train loss 2.5000 (step 4), val main 2.9000 (step 4), val mtp 3.4000 (step 2)" in out
