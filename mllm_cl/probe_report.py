"""The live probe's records against the accuracy matrix: `python -m mllm_cl report`'s probe section.

Zhu et al. 2025 relate the counting bias (probability on number tokens while answering non-counting
prompts) to held-out forgetting. Here each accuracy-matrix row is paired with the probe record taken
at the same point (``base`` with row 0, ``after_<task>`` with the row after that task), and Pearson's r
is computed across rows between each probe set's number mass and the mean held-out change
Δ_i = mean_h R[i, h] - R[0, h] (`mllm_cl.continual`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np

from mllm_cl.continual import per_row_summary
from mllm_cl.results import StreamResults


def read_probe(run_dir: str) -> list[dict]:
    """The live probe's records (``probe.jsonl`` in the run directory), [] when there is none."""
    path = os.path.join(run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir), "probe.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _probe_sets(record: dict) -> dict[str, float]:
    """{probe set: number mass} of one record (older records: one unnamed set, "default")."""
    if "sets" in record:
        return {name: float(stats["number_mass"]) for name, stats in record["sets"].items()}
    return {"default": float(record["number_mass"])} if "number_mass" in record else {}


def probe_rows(res: StreamResults, records: Sequence[dict]) -> list[tuple[str, float, dict[str, float]]]:
    """(row label, held-out change, {probe set: number mass}) per matrix row that has a probe record.

    Row 0 pairs with the probe's ``base`` record, the row after task t with ``after_<t>`` (the last
    record of that label wins, so a resumed run's repeat counts once).
    """
    by_label = {r["label"]: r for r in records}
    changes = per_row_summary(res.rows, len(res.tasks)) if res.rows else []
    out = []
    for i, (label, per_row) in enumerate(zip(res.labels, changes, strict=True)):
        record = by_label.get("base" if i == 0 else f"after_{label}")
        if record is not None:
            out.append((label, per_row["heldout_change"], _probe_sets(record)))
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r of paired values (NaN pairs dropped); NaN with < 3 pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3:
        return math.nan
    a, b = (np.array(v, dtype=float) for v in zip(*pairs, strict=True))
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


def probe_correlation(res: StreamResults, records: Sequence[dict]) -> dict[str, tuple[float, int]]:
    """{probe set: (r, rows)}: correlation across rows of the number mass with the held-out change."""
    rows = probe_rows(res, records)
    names = sorted({n for _, _, sets in rows for n in sets})
    out = {}
    for name in names:
        kept = [(change, sets[name]) for _, change, sets in rows if name in sets]
        out[name] = (pearson([m for _, m in kept], [c for c, _ in kept]), len(kept))
    return out
