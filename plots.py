"""Pictures for the demos: PNG with matplotlib when it is installed (`pip install -e ".[plot]"`), text otherwise.

Every picture has a text form that fits a terminal (lines of at most 100 characters), so nothing here needs
matplotlib; `--png PATH` on a command line adds the PNG. Used by `python dualpipe.py` (pipeline timelines),
`python moe.py` (expert load over bias-update steps) and this file's own command line, the loss curves of a
training run:

    python plots.py out/log.jsonl                  # train and validation loss against the step, as text
    python plots.py out/log.jsonl --png loss.png   # the same as a PNG

`train.py` writes log.jsonl: one JSON object per line, training records {"step", "loss", "main", "mtp",
"balance", "lr", "grad_norm", "tok_per_s"} every log_interval steps and evaluation records {"step", "val_main",
"val_mtp", "val_mtp_acc", "max_violation"} every eval_interval steps.
"""
import argparse
import contextlib
import json
import math
import os
import sys

SHADES = " .:-=+*#%@"  # text heat map, from 0 to the top of the scale


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def need_pyplot(what: str):
    plt = pyplot()
    if plt is None:
        raise ValueError(f"{what} needs matplotlib (pip install matplotlib, or pip install -e \".[plot]\"); "
                         "the text picture shows the same data")
    return plt


# -- text ------------------------------------------------------------------------------------------------------
def text_chart(series, width: int = 72, height: int = 14, ylabel: str = "", xlabel: str = "") -> list:
    """Scatter of series [(name, mark, xs, ys), ...] on a character grid; returns the lines (≤ width + 10)."""
    pts = [(x, y) for _, _, xs, ys in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not pts:
        raise ValueError("text_chart: no finite points to draw")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    xs_span, ys_span = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    grid = [[" "] * width for _ in range(height)]
    for _, mark, xs, ys in series:
        for x, y in zip(xs, ys):
            if math.isfinite(y):
                col = round((x - x0) / xs_span * (width - 1))
                row = height - 1 - round((y - y0) / ys_span * (height - 1))
                grid[row][col] = mark if grid[row][col] in (" ", mark) else "&"  # & = points of several
    lines = [f"{ylabel}"] if ylabel else []
    for r, row in enumerate(grid):
        label = f"{y1 - r * ys_span / (height - 1):8.4g}" if r in (0, height // 2, height - 1) else ""
        lines.append(f"{label:>8s} |{''.join(row)}".rstrip())
    lines.append(" " * 9 + "+" + "-" * width)
    left, right = f"{x0:g}", f"{x1:g}"
    lines.append(" " * 10 + left + xlabel.center(width - len(left) - len(right)) + right)
    lines.append(" " * 10 + "   ".join(f"{mark} {name}" for name, mark, _, _ in series) + "   & several")
    return lines


def text_heatmap(rows, labels, top: float) -> list:
    """One line per row: each value v becomes a character of SHADES, ' ' at 0 up to '@' at v ≥ top."""
    out = []
    for label, row in zip(labels, rows):
        cells = [SHADES[min(len(SHADES) - 1, max(0, math.ceil(v / top * (len(SHADES) - 1))))] for v in row]
        out.append(f"{label} |{''.join(cells)}|")
    return out


# -- PNG ---------------------------------------------------------------------------------------------------------
def png_curves(path: str, series, title: str, xlabel: str, ylabel: str) -> None:
    """Line plot of series [(name, mark, xs, ys), ...]."""
    plt = need_pyplot("a PNG")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, mark, xs, ys in series:
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def png_heatmap(path: str, rows, title: str, xlabel: str, ylabel: str, clabel: str) -> None:
    """Image of a matrix rows[i][j] (row i drawn at height i)."""
    plt = need_pyplot("a PNG")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    im = ax.imshow(rows, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax, label=clabel)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def png_gantt(path: str, panels) -> None:
    """Pipeline timelines: panels [(title, rows)], rows[r] = [(start, end, kind, label), ...] for rank r, kind
    one of F, B, I (input-grad backward), W (weight-grad), with "^" or "_" appended for the upper or lower half
    of the bar (the two halves of an overlapped F&B pair share its time)."""
    plt = need_pyplot("a PNG")
    colors = {"F": "#4c9be8", "B": "#e8804c", "I": "#e8c14c", "W": "#7bc96f"}
    height = 1.2 + sum(0.3 * len(rows) + 0.5 for _, rows in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, height), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], panels):
        for r, spans in enumerate(rows):
            for start, end, kind, label in spans:
                half = {"^": -0.2, "_": 0.2}.get(kind[-1], 0.0)  # y grows downwards (inverted axis)
                y, h = r + half, 0.4 if half else 0.8
                ax.barh(y, end - start, h, left=start, color=colors[kind[0]], edgecolor="black", linewidth=0.4)
                if end - start >= 1:
                    ax.text((start + end) / 2, y, label, ha="center", va="center", fontsize=5)
        ax.set_yticks(range(len(rows)), [f"rank {r}" for r in range(len(rows))], fontsize=7)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("time (cost units); white = idle (the bubble); split bars = an overlapped F&B pair")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, ["forward", "full backward", "input-grad backward", "weight-grad"], loc="upper right",
               ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- loss curves of train.py's log.jsonl ---------------------------------------------------------------------------
LOSS_KEYS = ("loss", "main", "val_main", "val_mtp")  # the values read_log checks and loss_series draws


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_log(path: str):
    """(training records, evaluation records) of a log.jsonl; a bad line raises ValueError with its number."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "log.jsonl")):  # the run folder (--out_dir)
        path = os.path.join(path, "log.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no log file at {path} (train.py writes <out_dir>/log.jsonl)")
    train, evals = [], []
    with open(path, encoding="utf-8", errors="replace") as f:  # damaged bytes: that line is not JSON, said below
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not a JSON object: {line.strip()[:60]!r}") from None
            if not isinstance(rec, dict) or not _is_number(rec.get("step")):
                raise ValueError(f"{path}:{n}: a record needs a numeric 'step' field")
            bad = [k for k in LOSS_KEYS if k in rec and not _is_number(rec[k])]
            if bad:
                raise ValueError(f"{path}:{n}: {bad[0]!r} is not a number: {rec[bad[0]]!r}")
            if "val_main" in rec:
                evals.append(rec)
            elif "main" in rec or "loss" in rec:  # records of other kinds (none yet) are left out
                train.append(rec)
    if not train and not evals:
        raise ValueError(f"{path}: no loss records")
    return train, evals


def loss_series(train, evals) -> list:
    """[(name, mark, steps, values)] of the main next-token loss in training and validation, and val MTP."""
    key = "main" if all("main" in r for r in train) else "loss"  # one quantity per curve
    train = [r for r in train if key in r]
    mtp = [r for r in evals if "val_mtp" in r]
    out = []
    if train:
        out.append((f"train {key}", "*", [r["step"] for r in train], [r[key] for r in train]))
    if evals:
        out.append(("val main", "o", [r["step"] for r in evals], [r["val_main"] for r in evals]))
    if any(r["val_mtp"] for r in mtp):  # a model without MTP logs 0
        out.append(("val mtp", "x", [r["step"] for r in mtp], [r["val_mtp"] for r in mtp]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Loss curves of a train.py run (its log.jsonl), as text or PNG.")
    p.add_argument("log", help="path of log.jsonl, or the run folder that holds it (train.py's --out_dir)")
    p.add_argument("--png", metavar="PATH", help="also write the curves as a PNG (needs matplotlib)")
    a = p.parse_args(argv)
    try:
        train, evals = read_log(a.log)
        series = loss_series(train, evals)
        if not any(math.isfinite(x) and math.isfinite(y) for *_, xs, ys in series for x, y in zip(xs, ys)):
            raise ValueError(f"{a.log}: no finite loss to draw (every loss is NaN or infinite: the run diverged)")
        print("\n".join(text_chart(series, ylabel="loss (nats/token)", xlabel="step")))
        print("last: " + ", ".join(f"{name} {ys[-1]:.4f} (step {xs[-1]})" for name, _, xs, ys in series))
        if a.png:
            png_curves(a.png, series, f"loss curves of {a.log}", "step", "loss (nats/token)")
            print(f"wrote {a.png}")
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, and keep Python's exit flush quiet too
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
