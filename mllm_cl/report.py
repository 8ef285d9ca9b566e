"""Compare finished runs the way Zhu et al. do: Δ learning and Δ held-out per recipe.

``python -m mllm_cl report RUN [RUN ...] [--names a b] [--out DIR] [--no-plots] [--format png|pdf|svg]``
reads each run
directory's ``results.json`` (written by ``fit``), prints a markdown comparison (numbers in percentage
points, NaN as "–"), every run's accuracy matrix, the 2x2 ID/OOD table when ``results.json`` has a
``domains`` dict ``{column: {"image": "id"|"ood", "text": "id"|"ood"}}``, each held-out set's curve
(base, lowest, final, max drop, recovered, chance or majority level: `mllm_cl.chance`), and, when the run directory has the live probe's
``probe.jsonl``, the correlation across matrix rows between the probe's number mass and the held-out
change; it writes ``report.md`` plus plots (heatmaps, held-out curves per run and per set, all in %
from 0 to 100: `mllm_cl.report_plots`) to ``--out`` (default: the first run's parent folder / ``report``). The measures are defined in
`mllm_cl.continual`. ``--examples N`` adds, per run, up to N answers per eval set that changed
between consecutive rows (`mllm_cl.predictions`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence

from mllm_cl.chance import levels
from mllm_cl.predictions import format_examples
from mllm_cl.probe_report import probe_correlation, probe_rows, read_probe
from mllm_cl.report_plots import (  # noqa: F401 (heatmap_figure, line_figure: imported from here by callers)
    DASH,
    FORMATS,
    MINUS,
    figures_for,
    fmt_pp,
    heatmap_figure,
    line_figure,
    save,
)
from mllm_cl.results import StreamResults, load_results

QUADRANTS = [("id", "id"), ("id", "ood"), ("ood", "id"), ("ood", "ood")]
COLUMNS = [  # (header, summary key, signed)
    ("Δ learning", "learning", True),
    ("Δ held-out", "heldout_change", True),
    ("Δ held-out (stage avg)", "heldout_change_avg", True),
    ("held-out max drop", "heldout_max_drop", True),
    ("held-out recovered", "heldout_recovery", True),
    ("final avg acc", "avg_accuracy", False),
    ("forgetting", "forgetting", True),
    ("BWT", "bwt", True),
    ("FWT", "fwt", True),
    ("held-out avg", "heldout_avg", False),
]


CHANCE_NOTE = (
    "The dashed lines in the held-out plots are these levels: *chance* = the mean over samples of "
    "1 / the number of options the prompt lists; *majority* = the share of samples whose reference is "
    "the set's most common answer (the accuracy of always giving it). The mean held-out plot draws "
    "their mean."
)
NO_CHANCE_NOTE = "No saved predictions (predictions/<row>/<set>.jsonl): the plots draw no chance line."


def quadrant_name(image: str, text: str) -> str:
    return f"{image.upper()} img / {text.upper()} text"


def _results_path(run_dir: str) -> str:
    return run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, "results.json")


def _folder(run_dir: str) -> str:
    path = os.path.abspath(run_dir)
    return os.path.dirname(path) if os.path.isfile(path) else path


def run_name(run_dir: str) -> str:
    """The run's display name: the `name` in results.json (its TensorBoard run name), else the recipe
    named in its config.yaml (``model.recipe.class_path``), else the folder name."""
    folder = _folder(run_dir)
    try:
        with open(_results_path(run_dir), encoding="utf-8") as fh:
            name = json.load(fh).get("name")
        if name:
            return name
    except (OSError, ValueError):
        pass
    try:
        import yaml

        with open(os.path.join(folder, "config.yaml"), encoding="utf-8") as fh:
            recipe = (yaml.safe_load(fh) or {}).get("model", {}).get("recipe")
        if isinstance(recipe, Mapping):
            recipe = recipe.get("class_path")
        if isinstance(recipe, str) and recipe:
            return recipe.rsplit(".", 1)[-1]
    except (OSError, AttributeError, ValueError, ImportError):
        pass
    return os.path.basename(folder)


def _names(run_dirs: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(run_dirs):
            raise ValueError(f"got {len(names)} names for {len(run_dirs)} runs")
        return list(names)
    out = [run_name(d) for d in run_dirs]  # same recipe twice: tell the runs apart by folder
    return [
        f"{n} ({os.path.basename(_folder(d))})" if out.count(n) > 1 else n
        for n, d in zip(out, run_dirs, strict=True)
    ]


def load_run(run_dir: str) -> tuple[StreamResults, dict]:
    """The run's StreamResults and the raw results.json dict (for optional keys such as ``domains``)."""
    with open(_results_path(run_dir), encoding="utf-8") as fh:
        raw = json.load(fh)
    return load_results(_results_path(run_dir)), raw


def quadrant_columns(columns: Sequence[str], domains: Mapping) -> dict[tuple[str, str], list[str]]:
    """{(image, text): the columns tagged so}, for the four ID/OOD quadrants; untagged columns are left out."""
    members: dict[tuple[str, str], list[str]] = {q: [] for q in QUADRANTS}
    for col, tags in domains.items():
        if col not in columns:
            continue
        key = (str(tags.get("image", "")).lower(), str(tags.get("text", "")).lower())
        if key not in members:
            raise ValueError(f"domains[{col!r}] = {dict(tags)}: image and text must each be 'id' or 'ood'")
        members[key].append(col)
    return members


def quadrants(results: StreamResults | Mapping, domains: Mapping | None = None) -> list[dict]:
    """Per matrix row, the mean accuracy over the columns of each ID/OOD image x text quadrant.

    ``results`` is a results.json dict (its ``domains`` is used) or a StreamResults with ``domains``
    given. Returns ``[]`` without domains; else one dict per row: ``label`` plus one key per quadrant
    (see :func:`quadrant_name`), NaN where a quadrant has no column or only NaN cells.
    """
    if isinstance(results, Mapping):
        domains = results.get("domains") if domains is None else domains
        results = StreamResults.from_dict(
            {**results, "matrix": [[math.nan if v is None else v for v in r] for r in results["matrix"]]}
        )
    if not domains:
        return []
    members = {
        q: [results.columns.index(c) for c in cols]
        for q, cols in quadrant_columns(results.columns, domains).items()
    }
    out = []
    for label, row in zip(results.labels, results.rows, strict=True):
        entry: dict = {"label": label}
        for q, cols in members.items():
            kept = [row[c] for c in cols if not math.isnan(row[c])]
            entry[quadrant_name(*q)] = sum(kept) / len(kept) if kept else math.nan
        out.append(entry)
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def matrix_markdown(results: StreamResults) -> str:
    """The accuracy matrix in percentage points (rows: base, after task 1, ...)."""
    rows = zip(results.labels, results.rows, strict=True)
    return _table(["after", *results.columns], [[label, *map(fmt_pp, row)] for label, row in rows])


def compare(run_dirs: list[str], names: list[str] | None = None) -> str:
    """Markdown: one comparison row per run (percentage points), then each run's matrix and 2x2 table."""
    names = _names(run_dirs, names)
    loaded = [load_run(d) for d in run_dirs]
    rows = []
    for name, (res, _) in zip(names, loaded, strict=True):
        s = res.summary()
        cells = [fmt_pp(s.get(key, math.nan), signed) for _, key, signed in COLUMNS]
        rows.append([name, *cells, f"{max(len(res.rows) - 1, 0)}/{len(res.tasks)}"])
    parts = [
        "## Comparison (percentage points)",
        _table(["run", *(h for h, _, _ in COLUMNS), "tasks trained"], rows),
    ]
    for name, run_dir, (res, raw) in zip(names, run_dirs, loaded, strict=True):
        parts += [f"## {name}", f"`{run_dir}` — tasks: {', '.join(res.tasks)}", matrix_markdown(res)]
        quads = quadrants(raw)
        filled = quads and sum(bool(c) for c in quadrant_columns(res.columns, raw["domains"]).values())
        if filled and filled > 1:  # a stream whose sets are all in one quadrant has no 2x2 to show
            header = [quadrant_name(*q) for q in QUADRANTS]
            body = [[q["label"], *(fmt_pp(q[h]) for h in header)] for q in quads]
            parts += [f"### {name}: ID / OOD (image x text)", _table(["after", *header], body)]
            members = quadrant_columns(res.columns, raw["domains"])
            parts.append(
                "\n".join(f"- {quadrant_name(*q)}: {', '.join(c) or DASH}" for q, c in members.items())
            )
        parts += heldout_curves_markdown(name, res, run_dir)
        parts += emt_markdown(name, res, run_dir)
        parts += probe_markdown(name, res, read_probe(run_dir))
    return "\n\n".join(parts) + "\n"


def heldout_curves_markdown(name: str, res: StreamResults, run_dir: str | None = None) -> list[str]:
    """Per held-out set: base, lowest after training, final, max drop, recovered (percentage points) and
    its chance or majority level (`mllm_cl.chance`, from the saved predictions of ``run_dir``)."""
    if not res.heldout or len(res.rows) < 2:
        return []
    s = res.summary()
    found = levels(_folder(run_dir)) if run_dir else {}
    body = []
    for h in res.heldout:
        j = res.columns.index(h)
        after = [row[j] for row in res.rows[1:] if not math.isnan(row[j])]
        lvl = found.get(h)
        body.append(
            [
                h,
                fmt_pp(res.rows[0][j]),
                fmt_pp(min(after) if after else math.nan),
                fmt_pp(res.rows[-1][j]),
                fmt_pp(s.get(f"heldout_max_drop/{j}", math.nan), True),
                fmt_pp(s.get(f"heldout_recovery/{j}", math.nan), True),
                f"{fmt_pp(lvl.value)} ({lvl.describe()})" if lvl else DASH,
            ]
        )
    header = ["held-out set", "base", "lowest", "final", "max drop", "recovered", "chance / majority"]
    return [f"### {name}: held-out sets", _table(header, body), CHANCE_NOTE if found else NO_CHANCE_NOTE]


def emt_markdown(name: str, res: StreamResults, run_dir: str) -> list[str]:
    """EMT: CLIP zero-shot (``emt_baseline.json``, `mllm_cl.emt.CLIPBaseline`) beside the MLLM's accuracy
    and unmatched (hallucination) rate, before training and after the last task."""
    path = os.path.join(_folder(run_dir), "emt_baseline.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        clip = json.load(fh)["sets"]
    parts = res.parts or [{}]

    def unmatched(row: int, col: str) -> str:
        value = (parts[row] if row < len(parts) else {}).get(col, {}).get("unmatched")
        return DASH if value is None else fmt_pp(value)

    body = []
    for col, scores in clip.items():
        j = res.columns.index(col) if col in res.columns else None
        mllm = [fmt_pp(res.rows[i][j]) if j is not None else DASH for i in (0, -1)]
        body.append(
            [col, fmt_pp(scores["accuracy"]), *mllm, unmatched(0, col), unmatched(len(parts) - 1, col)]
        )
    header = ["set", "CLIP zero-shot", "MLLM before", "MLLM final", "unmatched before", "unmatched final"]
    return [f"### {name}: EMT, the MLLM vs its vision encoder", _table(header, body)]


def probe_markdown(name: str, res: StreamResults, records: Sequence[dict]) -> list[str]:
    rows = probe_rows(res, records)
    if not rows:
        return []
    sets = sorted({n for _, _, s in rows for n in s})
    body = [
        [label, fmt_pp(change, True), *(f"{s.get(n, math.nan):.4f}" for n in sets)]
        for label, change, s in rows
    ]
    corr = probe_correlation(res, records)
    lines = "\n".join(
        f"- {n}: r = {DASH if math.isnan(r) else f'{r:+.2f}'.replace('-', MINUS)} over {k} rows"
        for n, (r, k) in corr.items()
    )
    return [
        f"### {name}: counting-bias probe vs held-out change",
        _table(["after", "Δ held-out", *(f"number mass ({n})" for n in sets)], body),
        "Pearson r across rows, number mass vs Δ held-out:\n" + lines,
    ]


def figures(run_dirs: list[str], names: list[str] | None = None) -> dict:
    """{file stem: matplotlib Figure}: per run a heatmap and a per-held-out-set plot, then the mean
    held-out and seen-task curves of all runs (`mllm_cl.report_plots` says what each shows)."""
    runs = [load_results(_results_path(d)) for d in run_dirs]
    return figures_for(_names(run_dirs, names), [_folder(d) for d in run_dirs], runs)


def plot(run_dirs: list[str], out_dir: str, names: list[str] | None = None, fmt: str = "png") -> list[str]:
    """Writes the figures of :func:`figures` as ``fmt`` (png, pdf or svg) files into ``out_dir``."""
    return save(figures(run_dirs, names), out_dir, fmt)


def log_figures_to_tensorboard(run_dir: str, figures: Mapping, step: int = 0) -> None:
    """Adds figures ({tag: matplotlib Figure}, e.g. from :func:`figures`) as images ``report/<tag>`` to
    the run's TensorBoard (an event file in ``run_dir``)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=_folder(run_dir))
    try:
        for tag, fig in figures.items():
            writer.add_figure(f"report/{tag}", fig, step, close=False)
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m mllm_cl report``: prints the comparison, writes report.md and PNGs; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m mllm_cl report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories holding results.json")
    parser.add_argument("--names", nargs="+", help="display names, one per run (default: the recipe)")
    parser.add_argument("--out", help="output folder (default: <first run's parent>/report)")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    parser.add_argument("--format", choices=FORMATS, default="png", help="plot file format (default: png)")
    parser.add_argument(
        "--examples",
        type=int,
        default=0,
        metavar="N",
        help="also show up to N changed answers per set and row",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.names is not None and len(args.names) != len(args.runs):
        parser.error(f"--names has {len(args.names)} names for {len(args.runs)} runs")
    for run in args.runs:
        if not os.path.isfile(_results_path(run)):
            hint = "run `python -m mllm_cl fit --config ...` first, it writes results.json there"
            print(f"error: {run} has no results.json; {hint}", file=sys.stderr)
            return 2
    try:
        text = compare(args.runs, args.names)
        if args.examples > 0:
            text += "".join("\n\n" + format_examples(_folder(run), args.examples) for run in args.runs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"error: cannot read the results ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    out = args.out or os.path.join(os.path.dirname(_folder(args.runs[0])), "report")
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "report.md")]
    with open(paths[0], "w", encoding="utf-8") as fh:
        fh.write(text)
    if not args.no_plots:
        paths += plot(args.runs, out, args.names, args.format)
    print(text)
    print("wrote:\n" + "\n".join(f"  {p}" for p in paths))
    return 0
