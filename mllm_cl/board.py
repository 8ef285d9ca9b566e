"""What a run shows in TensorBoard: the matrix as numbers, picture and table, answers, hparams.

Per-row series use the **row index** as their step (0 = before training, i = after task i), so a
stream of T tasks gives T + 1 points; training series (`train/*`, `lr-*`) use the optimizer step.

| tag | what |
|---|---|
| `acc/task/<set>` | accuracy on a trained task's eval set, per row |
| `acc/heldout/<set>` | accuracy on a held-out set, per row |
| `cl/<measure>` | continual-learning measures of the matrix so far (see `mllm_cl.continual`) |
| `parts/<set>/<part>` | sub-scores a metric reports (hour/minute, unmatched, PathVQA F1, ...) |
| `matrix/heatmap` (image), `matrix/table` (text) | the accuracy matrix so far |
| `answers/<set>` (text) | the same 8 samples of each set every row: prompt, reference, answer, correct? |
| `train/ce`, `train/<Strategy>`, `train/loss` | CE, each strategy's extra term, and their sum (only with a term) |
| `lr-AdamW/*` | learning rate per parameter group (LearningRateMonitor) |
| HParams tab | method (run name), recipe, strategies and their arguments, tasks, seed, batch; final measures as metrics |

NaN (an undefined measure, e.g. forgetting before two tasks) is never logged: TensorBoard would draw
it as a point.
"""

from __future__ import annotations

import hashlib
import math

from mllm_cl.report import matrix_markdown
from mllm_cl.report_plots import heatmap_figure
from mllm_cl.results import StreamResults

ANSWERS_PER_SET = 8
TABLE_NOTE = "Accuracy in % (as the heatmap and report.md); rows: after training; – : not evaluated."
# The HParams table's default columns (see hparams_summaries).
PRIMARY_HPARAMS = ("method", "recipe", "strategies", "tasks", "params_trainable")
FINAL_MEASURES = ("avg_accuracy", "learning", "heldout_change", "forgetting", "bwt", "fwt", "heldout_avg")


def _finite(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def row_scalars(results: StreamResults, parts: dict[str, dict[str, float]]) -> dict[str, float]:
    """The scalars of the newest row: per-set accuracy, the measures so far, metric parts (no NaN)."""
    tasks = set(results.tasks)
    row = dict(zip(results.columns, results.rows[-1], strict=True))
    scalars = {f"acc/{'task' if c in tasks else 'heldout'}/{c}": v for c, v in row.items()}
    scalars.update({f"cl/{k}": v for k, v in results.summary().items() if "/" not in k})
    scalars.update({f"parts/{name}/{k}": v for name, p in parts.items() for k, v in p.items()})
    return _finite(scalars)


def pick_samples(records: list[dict], n: int = ANSWERS_PER_SET) -> list[dict]:
    """`n` records chosen by a hash of their id: the same samples every row, spread over the set."""
    chosen = sorted(records, key=lambda r: hashlib.sha1(str(r["id"]).encode()).hexdigest())[:n]
    return sorted(chosen, key=lambda r: str(r["id"]))


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:200]


def answers_markdown(records: list[dict]) -> str:
    lines = ["| id | prompt | reference | answer | correct? |", "|---|---|---|---|---|"]
    for r in pick_samples(records):
        refs = r["references"][0] if len(r["references"]) == 1 else " / ".join(map(str, r["references"][:3]))
        mark = "yes" if r["score"] >= 1 else ("no" if r["score"] <= 0 else f"{r['score']:.2f}")
        lines.append(
            f"| {_cell(r['id'])} | {_cell(r['prompt'])} | {_cell(refs)} | {_cell(r['prediction'])} | {mark} |"
        )
    return "\n".join(lines)


def layout(results: StreamResults) -> dict:
    """TensorBoard custom-scalars layout: trained tasks vs held-out sets, measures, training."""
    return {
        "accuracy (x: row)": {
            "trained tasks": ["Multiline", [f"acc/task/{c}" for c in results.tasks]],
            "held-out sets": ["Multiline", [f"acc/heldout/{c}" for c in results.heldout]],
        },
        "continual measures (x: row)": {m: ["Multiline", [f"cl/{m}"]] for m in FINAL_MEASURES},
        "training (x: optimizer step)": {
            "loss": ["Multiline", [r"train/.*"]],
            "learning rate": ["Multiline", [r"lr-.*"]],
        },
    }


def log_start(logger, results: StreamResults, param_counts: dict) -> None:
    """Once per run: the custom-scalars layout and the parameter counts as a text table."""
    writer = logger.experiment
    writer.add_custom_scalars(layout(results))
    rows = [f"| {k} | {v['trainable']:,} | {v['total']:,} |" for k, v in param_counts.items()]
    table = "| component | trainable | total |\n|---|---|---|\n" + "\n".join(rows)
    writer.add_text("run/parameters", table, 0)


def log_row(logger, results: StreamResults, column_results: dict, title: str) -> None:
    """After each row: scalars, the matrix heatmap (image) and table (text), sample answers (text)."""
    row = len(results.rows) - 1
    parts = {name: r.parts for name, r in column_results.items()}
    logger.log_metrics(row_scalars(results, parts), step=row)
    writer = logger.experiment
    writer.add_figure("matrix/heatmap", heatmap_figure(results, title), row, close=True)
    writer.add_text("matrix/table", f"{matrix_markdown(results)}\n\n{TABLE_NOTE}", row)
    for name, r in column_results.items():
        if r.records:
            writer.add_text(f"answers/{name}", answers_markdown(r.records), row)
    writer.flush()


def run_hparams(module) -> dict:
    """Recipe, strategies with their arguments, tasks, seed and batch: what tells runs apart."""
    stream, hp = module.stream, module.hparams
    params = {
        "method": module.run_name,  # the run name, e.g. saproj+lwf, full+wiseft0.5
        "recipe": type(module.recipe).__name__,
        "strategies": "+".join(type(s).__name__ for s in module.strategies) or "none",
        "tasks": ",".join(t.name for t in stream.tasks),
        "seed": stream.seed,
        "batch_size": stream.batch_size,
        "lr": hp.lr,
        "family": hp.family,
        "pretrained": hp.pretrained or f"tiny:{hp.tiny}",
    }
    for strategy in module.strategies:
        name = type(strategy).__name__
        params.update(
            {
                f"{name}.{k}": v
                for k, v in vars(strategy).items()
                if not k.startswith("_") and isinstance(v, (int, float, str, bool))
            }
        )
    counts = module.param_counts.get("total", {})
    params.update({f"params_{k}": v for k, v in counts.items()})
    return params


def hparams_summaries(params: dict, metrics: dict) -> tuple:
    """TensorBoard's hparams summaries (experiment, session start, session end) for one run.

    TensorBoard reads the experiment of one run only (the first it finds) and its table shows the
    first 5 hparams sorted by (not ``differs``, name). Unmarked, those would be batch_size, family,
    lr, params_total, params_trainable, and the recipe would be hidden. So the hparams that tell
    runs apart (PRIMARY_HPARAMS) are marked ``differs`` and come first."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    exp, ssi, sei = hparams(params, metrics)
    value = exp.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in PRIMARY_HPARAMS
    value.metadata.plugin_data.content = data.SerializeToString()
    return exp, ssi, sei


def log_final(logger, module, results: StreamResults) -> None:
    """At the stream's end: hparams with the final measures as its metrics, logged at the last row
    (no placeholder hp_metric)."""
    summary = results.summary()
    metrics = _finite({f"final/{k}": summary.get(k, math.nan) for k in FINAL_MEASURES})
    params = run_hparams(module)
    logger.hparams.update(params)  # hparams.yaml, as Lightning's log_hyperparams keeps them
    step = len(results.rows) - 1
    logger.log_metrics(metrics, step=step)
    writer = logger.experiment._get_file_writer()
    for item in hparams_summaries(params, metrics):
        writer.add_summary(item, step)
    logger.experiment.flush()
