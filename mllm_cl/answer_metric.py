"""The base class of every answer metric (re-exported as ``mllm_cl.metrics.AnswerMetric``).

Contract with the evaluation loop:

- ``update(preds, targets, **fields)``: one generated answer per sample and, per sample, one
  reference or a list of them. A metric that needs per-sample context names it in
  ``sample_fields`` and receives each as a list aligned with ``preds``: ``"prompt"`` is the text
  of the last user message as sent (options included); other fields come from the sample's
  ``"fields"`` mapping (see ``mllm_cl.data.benchmarks``). A declared field that is not passed
  arrives as None per sample.
- ``score_sample(prediction, references, **fields)``: ``{"score": headline, <part>: value, ...}``
  for one sample (written to the per-sample prediction files). A part missing from a sample's
  dict does not apply to it (e.g. yes/no accuracy on an open question).
- ``compute()``: the headline; ``compute_parts()``: every part the papers report, each the mean
  over the samples it applies to (NaN when it applied to none).
- ``validate_references(references)``: raises ValueError (one line) when the eval set cannot be
  scored faithfully; called on every ``update`` too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchmetrics

Targets = Sequence[str | Sequence[str]]  # per sample: one reference or a list of references


def reference_lists(preds: Sequence[str], targets: Targets) -> list[list[str]]:
    """Per sample, its references as a list (a bare string becomes a one-item list)."""
    # A bare string would otherwise be iterated character by character.
    if isinstance(preds, str):
        raise TypeError("preds must be a list of strings, not a single string")
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets")
    return [[t] if isinstance(t, str) else list(t) for t in targets]


class AnswerMetric(torchmetrics.Metric):
    """Mean per-sample score of free-text answers; subclasses implement :meth:`score`
    (or :meth:`score_sample` when they report parts).

    States ``correct`` (summed scores), ``total`` (samples) and, per name in ``part_names``,
    ``<name>`` (summed part values) and ``<name>_n`` (samples it applied to) are summed across
    processes.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    sample_fields: tuple[str, ...] = ()
    part_names: tuple[str, ...] = ()

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        for name in self.part_names:
            if hasattr(self, name):  # a part must not shadow a Metric attribute
                raise TypeError(f"{type(self).__name__}: part name {name!r} clashes with an attribute")
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")
            self.add_state(f"{name}_n", default=torch.tensor(0), dist_reduce_fx="sum")

    def score(self, prediction: str, references: list[str], **fields) -> float:
        """Scores one generated answer against its acceptable references, in [0, 1]."""
        if type(self).score_sample is AnswerMetric.score_sample:  # each default calls the other
            raise NotImplementedError(f"{type(self).__name__} implements neither score nor score_sample")
        return self.score_sample(prediction, references, **fields)["score"]

    def score_sample(self, prediction: str, references: list[str], **fields) -> dict[str, float]:
        """The headline score of one sample under "score", plus its parts."""
        return {"score": float(self.score(prediction, references, **fields))}

    def validate_references(self, references: list[list[str]]) -> None:
        """Raises ValueError when these references cannot be scored faithfully (default: never)."""

    def update(self, preds: Sequence[str], targets: Targets, **fields: Sequence) -> None:
        """Adds a batch: answers, references per sample, and the declared per-sample fields."""
        refs = reference_lists(preds, targets)
        self.validate_references(refs)
        per_sample = self._per_sample(len(refs), fields)
        samples = [self.score_sample(p, r, **f) for p, r, f in zip(preds, refs, per_sample, strict=True)]
        self._accumulate(samples, per_sample)

    def _per_sample(self, n: int, fields: dict) -> list[dict]:
        unknown = sorted(set(fields) - set(self.sample_fields))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.update got fields {unknown}; it takes {list(self.sample_fields)}"
            )
        for name, values in fields.items():
            if values is not None and len(values) != n:
                raise ValueError(f"field {name!r} has {len(values)} values for {n} predictions")
        columns = {k: fields.get(k) or [None] * n for k in self.sample_fields}
        return [{k: columns[k][i] for k in self.sample_fields} for i in range(n)]

    def _accumulate(self, samples: list[dict[str, float]], fields: list[dict]) -> None:
        self.correct += float(sum(s["score"] for s in samples))
        self.total += len(samples)
        for name in self.part_names:
            values = [s[name] for s in samples if name in s and not math.isnan(s[name])]
            setattr(self, name, getattr(self, name) + float(sum(values)))
            setattr(self, f"{name}_n", getattr(self, f"{name}_n") + len(values))

    def compute(self) -> torch.Tensor:
        """Returns the mean score, or 0.0 when nothing was added."""
        if self.total == 0:
            return torch.zeros((), device=self.correct.device)
        return self.correct / self.total

    def compute_parts(self) -> dict[str, torch.Tensor]:
        """Every reported part: its mean over the samples it applied to, synced across processes."""
        with self.sync_context():
            return {name: _mean(getattr(self, name), getattr(self, f"{name}_n")) for name in self.part_names}


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # NaN, not 0, when a part applied to no sample (e.g. no yes/no question in the set).
    return total / count if count > 0 else torch.full((), math.nan, device=total.device)
