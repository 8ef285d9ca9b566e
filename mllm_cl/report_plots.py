"""The plots of ``python -m mllm_cl report`` (and the TensorBoard heatmap, `mllm_cl.board`).

Every accuracy axis and colour scale runs from 0 to 100 % (never auto-zoomed, one unit), so two
plots can be compared by eye. What each figure shows:

- ``heatmap_<run>``: the accuracy matrix. Rows: base, then after each task; columns: the tasks, then
  (right of the white line) the held-out sets. The diagonal cells (row i = after task i, column task
  i: the accuracy just after learning it) are outlined in red. Untrained cells are hatched: task
  column j in rows base .. after task j-1, i.e. before task j was trained (row "base" included:
  nothing is trained there). Held-out columns are never trained and never hatched. The title's
  second and third lines are the run's summary (percentage points, as in report.md).
- ``heldout_sets_<run>``: each held-out set across the stream, with its chance or majority level
  (`mllm_cl.chance`) as a dashed line of the same colour.
- ``heldout`` / ``avg_seen``: the mean held-out accuracy / the mean over trained tasks, one line per
  run; the legend carries each run's headline numbers and ``heldout`` the mean chance level of the
  held-out sets as a dashed line (one grey line when all runs share it).

A level is drawn only where the run has saved predictions for every set it averages.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

from mllm_cl.chance import Level, levels
from mllm_cl.continual import per_row_summary
from mllm_cl.results import StreamResults

MINUS = "\u2212"
DASH = "\u2013"
FORMATS = ("png", "pdf", "svg")
DIAGONAL_GID, UNTRAINED_GID, BASELINE_GID = "diagonal", "untrained", "baseline"
GREY = "0.35"
# The summary in the heatmap's title: (label, summary key, signed), two lines.
SUMMARY_LINES = (
    (
        ("avg acc", "avg_accuracy", False),
        ("Δ learning", "learning", True),
        ("Δ held-out", "heldout_change", True),
    ),
    (("forgetting", "forgetting", True), ("BWT", "bwt", True), ("FWT", "fwt", True)),
)


def fmt_pp(value: float, signed: bool = False) -> str:
    """A fraction as percentage points with one decimal: 0.249 -> "+24.9" (signed), NaN -> "–"."""
    if value is None or math.isnan(value):
        return DASH
    pp = round(float(value) * 100, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return (f"{pp:+.1f}" if signed else f"{pp:.1f}").replace("-", MINUS)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def summary_text(results: StreamResults) -> str:
    """The run's summary in percentage points, two lines (see SUMMARY_LINES)."""
    s = results.summary()
    return "\n".join(
        " · ".join(f"{label} {fmt_pp(s.get(key, math.nan), signed)}" for label, key, signed in line)
        for line in SUMMARY_LINES
    )


def diagonal_cells(n_tasks: int, n_rows: int) -> list[tuple[int, int]]:
    """(row, column) of the diagonal: row i + 1 (after task i) x column i, for rows that exist."""
    return [(i + 1, i) for i in range(n_tasks) if i + 1 < n_rows]


def untrained_cells(n_tasks: int, n_rows: int) -> list[tuple[int, int]]:
    """(row, column) of task cells before that task was trained: column j in rows 0..j."""
    return [(r, j) for j in range(n_tasks) for r in range(min(j + 1, n_rows))]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def heatmap_figure(results: StreamResults, title: str):
    """Figure of the accuracy matrix in %: colour scale 0..100, values annotated, NaN cells grey,
    the diagonal outlined, untrained task cells hatched, the run's summary under the title."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    data = np.array(results.rows, dtype=float).reshape(len(results.rows), len(results.columns)) * 100
    nrows, ncols = data.shape
    fig, ax = _figure(max(5.5, 0.75 * ncols + 2.5), max(3.4, 0.55 * nrows + 2.2))
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_xticks(range(ncols), results.columns, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(nrows), results.labels)
    ax.set_xlabel("eval set (tasks | held-out)")
    ax.set_ylabel("after training")
    n_tasks = len(results.tasks)
    if results.heldout and results.tasks:
        ax.axvline(n_tasks - 0.5, color="white", linewidth=2)
    for r, j in untrained_cells(n_tasks, nrows):
        cell = Rectangle((j - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", edgecolor=GREY, linewidth=0)
        cell.set_gid(f"{UNTRAINED_GID}-{r}-{j}")
        ax.add_patch(cell)
    for r, j in diagonal_cells(n_tasks, nrows):
        cell = Rectangle((j - 0.47, r - 0.47), 0.94, 0.94, fill=False, edgecolor="red", linewidth=2)
        cell.set_gid(f"{DIAGONAL_GID}-{r}-{j}")
        ax.add_patch(cell)
    for i in range(nrows):
        for j in range(ncols):
            v = data[i, j]
            text, colour = (DASH, "black") if math.isnan(v) else (f"{v:.1f}", "white" if v < 50 else "black")
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    ax.set_title(f"{title}: accuracy matrix (%)\n{summary_text(results)}", fontsize=9)
    return fig


def line_figure(
    series: Mapping[str, Sequence[float]],
    labels: Sequence[str],
    title: str,
    ylabel: str,
    baselines: Sequence[tuple[float, str, int | None]] = (),
):
    """One line per series over the stream (x = row labels, y = accuracy in %, 0..100); NaN points are
    gaps. ``baselines``: (level as a fraction, legend label, index of the series whose colour it takes
    or None for grey), drawn dashed."""
    fig, ax = _figure(max(5.5, 0.8 * len(labels) + 2.5), 4.2)
    for i, (name, values) in enumerate(series.items()):
        ax.plot(
            range(len(values)),
            [v * 100 for v in values],
            marker="o",
            label=name,
            color=f"C{i}",
            clip_on=False,
        )
    for n, (value, label, index) in enumerate(baselines):
        colour = GREY if index is None else f"C{index}"
        line = ax.axhline(value * 100, linestyle="--", linewidth=1.2, color=colour, label=label)
        line.set_gid(f"{BASELINE_GID}-{n}")
    ax.set_ylim(0, 100)  # after every artist: never auto-zoomed
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_xlabel("after training")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if series or baselines:
        ax.legend(fontsize=7)
    return fig


def _level_label(name: str, lvl: Level) -> str:
    return f"{name}: {lvl.kind} {fmt_pp(lvl.value)} ({lvl.detail})"


def mean_level(res: StreamResults, found: Mapping[str, Level]) -> Level | None:
    """The mean of the held-out sets' levels; None unless every held-out set has one."""
    if not res.heldout or any(h not in found for h in res.heldout):
        return None
    kinds = sorted({found[h].kind for h in res.heldout})
    value = sum(found[h].value for h in res.heldout) / len(res.heldout)
    return Level(value, "/".join(kinds), f"mean of {len(res.heldout)} held-out sets")


def _pp(res: StreamResults, key: str, signed: bool = False) -> str:
    return fmt_pp(res.summary().get(key, math.nan), signed)


def heldout_sets_figure(name: str, res: StreamResults, found: Mapping[str, Level]):
    """Each held-out set's accuracy over the stream, its level dashed in its colour, the run's held-out
    summary in the title."""
    series = {h: [row[res.columns.index(h)] for row in res.rows] for h in res.heldout}
    lines = [(found[h].value, _level_label(h, found[h]), k) for k, h in enumerate(res.heldout) if h in found]
    title = (
        f"{name}: each held-out set across the stream\nΔ held-out {_pp(res, 'heldout_change', True)}"
        f" · max drop {_pp(res, 'heldout_max_drop', True)} · recovered {_pp(res, 'heldout_recovery', True)}"
    )
    return line_figure(series, res.labels, title, "accuracy (%)", lines)


def figures_for(names: Sequence[str], folders: Sequence[str], runs: Sequence[StreamResults]) -> dict:
    """{file stem: Figure}: per run a heatmap and a per-held-out-set plot, then the mean held-out and
    seen-task curves of all runs (see the module docstring)."""
    found = [levels(folder) for folder in folders]
    out = {}
    for prefix, make in (
        ("heatmap", lambda name, res, lv: heatmap_figure(res, name)),
        (
            "heldout_sets",
            lambda name, res, lv: heldout_sets_figure(name, res, lv) if res.heldout and res.rows else None,
        ),
    ):
        for i, (name, res, lv) in enumerate(zip(names, runs, found, strict=True)):
            fig, stem = make(name, res, lv), f"{prefix}_{safe_name(name)}"
            if fig is not None:
                out[stem if stem not in out else f"{stem}_{i}"] = fig
    per_row = [per_row_summary(r.rows, len(r.tasks)) if r.rows else [] for r in runs]
    labels = max((r.labels for r in runs), key=len, default=[])
    heldout = {
        f"{n}: Δ held-out {_pp(r, 'heldout_change', True)}": [p["heldout_avg"] for p in rows]
        for n, r, rows in zip(names, runs, per_row, strict=True)
    }
    means = [mean_level(r, lv) for r, lv in zip(runs, found, strict=True)]
    out["heldout"] = line_figure(
        heldout,
        labels,
        "Held-out accuracy across the stream",
        "mean held-out accuracy (%)",
        _mean_lines(names, means),
    )
    seen = {
        f"{n}: avg acc {_pp(r, 'avg_accuracy')}, forgetting {_pp(r, 'forgetting', True)}": [
            p["avg_seen"] for p in rows
        ]
        for n, r, rows in zip(names, runs, per_row, strict=True)
    }
    out["avg_seen"] = line_figure(
        seen, labels, "Average accuracy over seen tasks", "mean accuracy on trained tasks (%)"
    )
    return out


def _mean_lines(names: Sequence[str], means: Sequence[Level | None]) -> list[tuple[float, str, int | None]]:
    """One grey line when every run has the same mean level, else one per run in its colour."""
    known = [(i, m) for i, m in enumerate(means) if m is not None]
    if not known:
        return []
    if len(known) == len(means) and max(m.value for m in means) - min(m.value for m in means) < 1e-9:
        return [(means[0].value, _level_label("held-out", means[0]), None)]
    return [(m.value, _level_label(names[i], m), i) for i, m in known]


def save(figures: Mapping, out_dir: str, fmt: str = "png") -> list[str]:
    """Writes each figure as ``<stem>.<fmt>`` (png, pdf or svg) into ``out_dir``; returns the paths."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for stem, fig in figures.items():
        path = os.path.join(out_dir, f"{stem}.{fmt}")
        fig.savefig(path, dpi=120, format=fmt)
        paths.append(path)
    return paths
