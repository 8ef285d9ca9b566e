"""Evaluation, in one place: eval columns, the scoring loop, predictions and result files.

Every consumer goes through the same pieces:

* an `EvalColumn` per column of the accuracy matrix, built once by the `TaskStream`: its name,
  samples, metric (name + args, resolved as config > the source's preset > ``exact_match``),
  generation options and 2x2 domains;
* a `ColumnScorer` that generates greedy answers for a batch, updates the column's metric with the
  per-sample fields the metric asks for (``sample_fields``) and keeps one prediction record per
  sample (id, prompt, prediction, references, score and metric parts);
* `evaluate`: the loop over columns used after every task, by WiSE-FT's α choice and by the
  monitors; Lightning's `validate` / `test` loop feeds the same scorers batch by batch.

Predictions are written as ``predictions/<row>/<set>.jsonl`` in the run directory (`write_predictions`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mllm_cl.data.collate import Encoder
from mllm_cl.data.meta import eval_meta
from mllm_cl.data.tables import tokens_view  # a sample without decoding its images
from mllm_cl.errors import ConfigError, DataError
from mllm_cl.metrics import build_metric
from mllm_cl.results import atomic_write, nan_to_none

DEFAULT_METRIC = "exact_match"


@dataclass
class EvalColumn:
    """One eval set as scored: a column of the accuracy matrix.

    Args:
        name: column name.
        table: the samples (dicts with id, messages, images, answers, optional fields).
        metric: metric name (see `mllm_cl.metrics.build_metric`).
        metric_args: keyword arguments of the metric.
        eval_batch_size: prompts per generation batch (None: the stream's default).
        max_new_tokens: generation budget (None: the module's default).
        stop: strings that end an answer.
        image_domain: "id" or "ood" relative to the training images (2x2 report).
        text_domain: "id" or "ood" relative to the training questions.
    """

    name: str
    table: Sequence[dict]
    metric: str = DEFAULT_METRIC
    metric_args: dict = field(default_factory=dict)
    eval_batch_size: int | None = None
    max_new_tokens: int | None = None
    stop: list[str] | None = None
    image_domain: str = "id"
    text_domain: str = "id"

    def new_metric(self):
        """A fresh metric of this column; a bad name or argument -> one-line ConfigError."""
        try:
            return build_metric(self.metric, **self.metric_args)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"eval set {self.name!r}: metric {self.metric!r} with metric_args {self.metric_args}: {err}"
            ) from err

    def check(self) -> None:
        """Refuse, before any model work, a column that cannot be scored (bad metric, domains, refs)."""
        metric = self.new_metric()
        for axis in ("image_domain", "text_domain"):
            if getattr(self, axis) not in ("id", "ood"):
                raise ConfigError(
                    f"eval set {self.name!r}: {axis}={getattr(self, axis)!r}; use 'id' or 'ood'"
                )
        # The head of the set, so a wrong reference format stops the run before the model loads;
        # `ColumnScorer.add` checks every batch too, so no sample is scored under a silent cap.
        head = [list(tokens_view(self.table, i)["answers"]) for i in range(min(len(self.table), 32))]
        self.validate(metric, head)

    def validate(self, metric, references: list[list[str]]) -> None:
        try:
            metric.validate_references(references)
        except ValueError as err:
            raise ConfigError(f"eval set {self.name!r}: {err}") from err


def resolve_column(name: str, source, owner, table, domains: tuple[str, str] = ("id", "id")) -> EvalColumn:
    """The column of `owner` (a Task or EvalSet): its own settings, else the source's preset defaults."""
    preset = source.eval_defaults

    def pick(key, fallback=None):
        value = getattr(owner, key)
        return value if value is not None else preset.get(key, fallback)

    return EvalColumn(
        name=name,
        table=table,
        metric=pick("metric", DEFAULT_METRIC),
        metric_args=dict(pick("metric_args", None) or {}),
        eval_batch_size=owner.eval_batch_size,
        max_new_tokens=pick("max_new_tokens"),
        stop=list(owner.stop) if owner.stop else None,
        image_domain=domains[0],
        text_domain=domains[1],
    )


@dataclass
class ColumnResult:
    """A column's score: the headline value, the metric's reported parts and the local predictions."""

    value: float
    parts: dict[str, float]
    records: list[dict]
    samples: int


def _field(meta: dict, name: str):
    """A per-sample metric field: the prompt or label set from the eval meta, else the sample's `fields`."""
    if name in ("prompt", "labels", "id"):
        return meta.get(name)
    return meta["fields"].get(name)


class ColumnScorer:
    """Scores one column batch by batch: generation, metric update, prediction records."""

    def __init__(self, column: EvalColumn, device=None):
        self.column = column
        self.metric = column.new_metric()
        if device is not None:
            self.metric = self.metric.to(device)
        self.records: list[dict] = []

    def add(self, module, batch: dict) -> list[str]:
        """Generate answers for a left-padded eval batch and score its non-padding rows."""
        preds = module.generate(batch, self.column.max_new_tokens, self.column.stop)
        kept = [(p, m) for p, m in zip(preds, batch["meta"], strict=True) if m["weight"]]
        if not kept:
            return preds
        self.column.validate(self.metric, [m["answers"] for _, m in kept])
        fields = {f: [_field(m, f) for _, m in kept] for f in self.metric.sample_fields}
        self.metric.update([p for p, _ in kept], [m["answers"] for _, m in kept], **fields)
        for k, (pred, meta) in enumerate(kept):
            one = {f: values[k] for f, values in fields.items()}
            self.records.append(
                {
                    "id": meta["id"],
                    "prompt": meta["prompt"],
                    "prediction": pred,
                    "references": meta["answers"],
                    **self.metric.score_sample(pred, meta["answers"], **one),
                }
            )
        return preds

    def result(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ColumnResult:
        """The synced metric value and parts (every rank must call it) plus this rank's records."""
        value = float(self.metric.compute())
        parts = {k: float(v) for k, v in self.metric.compute_parts().items()}
        total = self.metric.total.float()
        samples = int(reduce_sum(total) if reduce_sum else total)
        return ColumnResult(value, parts, self.records, samples)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(model):
    """`model.eval()` and no gradients inside; the previous train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def prompt_batches(module, samples: Sequence[dict], batch_size: int) -> Iterator[dict]:
    """Left-padded generation batches (with scoring meta) of `samples`, on the module's device.

    For sample lists outside the stream (monitors, the probe); the stream's own eval loaders do the
    same in dataloader workers.
    """
    encoder = Encoder(module.family, module.processor, max_length=10**9)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = encoder.collate([encoder.encode_prompt(s) for s in chunk], padding_side="left")
        batch["meta"] = [eval_meta(s, scored=True) for s in chunk]
        yield to_device(batch, module.device)


def evaluate(module, columns: Sequence[EvalColumn], loaders: Callable[[int], Iterable[dict]]):
    """Score every column with `module` in eval mode; `loaders(i)` yields this rank's batches of column i.

    Returns {column name: ColumnResult}.
    """
    out = {}
    with eval_mode(module.model):
        for i, column in enumerate(columns):
            scorer = ColumnScorer(column, module.device)
            for batch in _progress(module, loaders(i), f"eval {column.name}"):
                scorer.add(module, to_device(batch, module.device))
            out[column.name] = scorer.result()
    return out


def _progress(module, batches: Iterable[dict], label: str) -> Iterable[dict]:
    """A progress bar over an eval set's batches when the run shows progress bars (rank 0 only):
    evaluating 14 benchmarks on a 7B model takes hours."""
    trainer = module._trainer
    if trainer is None or trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return batches
    return tqdm(batches, desc=label, total=len(batches) if hasattr(batches, "__len__") else None, leave=False)


def outside_columns(sets: Sequence, limit: int | None = None) -> list[EvalColumn]:
    """Columns of eval sets scored outside the accuracy matrix (WiSE-FT's validation sets): each an
    `EvalSet`-like object (name, data, metric settings, domains), cut to its first `limit` samples."""
    columns = []
    for s in sets:
        table = s.data.load()
        if len(table) == 0:
            raise DataError(f"eval set {s.name!r}: {s.data.describe()} has no samples")
        table = [table[i] for i in range(min(len(table), limit or len(table)))]
        column = resolve_column(s.name, s.data, s, table, (s.image_domain, s.text_domain))
        column.check()
        columns.append(column)
    return columns


def evaluate_outside(module, columns: Sequence[EvalColumn], batch_size: int) -> dict[str, ColumnResult]:
    """Score columns whose samples live outside the stream's loaders (`prompt_batches`).

    Every rank scores every sample (same batches, so generation stays in step across ranks); the
    synced metric is then the single-process mean.
    """
    return evaluate(
        module,
        columns,
        lambda i: prompt_batches(module, columns[i].table, columns[i].eval_batch_size or batch_size),
    )


def eval_domains(columns: Sequence[EvalColumn]) -> dict[str, dict[str, str]]:
    """{column: {"image": ..., "text": ...}} of every eval set, for the 2x2 ID/OOD report."""
    return {c.name: {"image": c.image_domain, "text": c.text_domain} for c in columns}


def gather_records(records: list[dict], world_size: int) -> list[dict]:
    """Every rank's prediction records (in id order of arrival per rank), on every rank."""
    if world_size <= 1 or not torch.distributed.is_initialized():
        return records
    parts: list = [None] * world_size
    torch.distributed.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def write_predictions(folder: str, results: dict[str, ColumnResult]) -> None:
    """``<folder>/<set>.jsonl``: one JSON line per scored sample (written atomically, 0644)."""
    for name, result in results.items():
        lines = "".join(json.dumps(nan_to_none(r), ensure_ascii=False) + "\n" for r in result.records)
        atomic_write(os.path.join(folder, f"{name}.jsonl"), lines)


def write_eval_results(module, results: dict[str, ColumnResult], log_dir: str) -> str:
    """`eval_<validate|test>.json` in `log_dir`: what was evaluated and the score per eval set."""
    trainer = module.trainer
    stage = str(trainer.state.fn.value if hasattr(trainer.state.fn, "value") else trainer.state.fn)
    record = {
        "stage": stage,
        "ckpt_path": trainer.ckpt_path,
        "pretrained": module.hparams.get("pretrained"),
        "accuracy": {k: r.value for k, r in results.items()},
        "parts": {k: r.parts for k, r in results.items() if r.parts},
        "samples": {k: r.samples for k, r in results.items()},  # scored samples, over all ranks
        "domains": eval_domains(trainer.datamodule.columns),
    }
    path = os.path.join(log_dir, f"eval_{stage}.json")
    atomic_write(path, json.dumps(record, indent=2))
    print(
        f"[mllm_cl] {stage}: "
        + ", ".join(f"{k}={v:.3f}" for k, v in record["accuracy"].items())
        + f" -> {path}"
    )
    return path
