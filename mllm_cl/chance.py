"""Chance and majority levels of an eval set, from a run's saved predictions: the floor under its plots.

An accuracy of 40 % means little until one knows that guessing gives 33 %. For every eval set with
saved predictions (``predictions/<row>/<set>.jsonl``, `mllm_cl.predictions`; the first row that has
the set is read, every row holds the same samples) the level is:

- **chance** when every sample's prompt lists its options, as letter lines ("A. ...", "(B) ...",
  MMStar's "A: ..., B: ...") or as a label set ("Choose one of: a, b, c.", EMT's "[a, b, c]"):
  the mean over samples of 1 / number of options, the accuracy of a uniform guess;
- **majority** otherwise (open answers, yes/no): the share of samples whose references contain the
  set's most common reference (lower-cased, stripped), the accuracy of always giving that answer
  under exact match. A model that learned only the answer prior reaches it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass

from mllm_cl.data.meta import prompt_labels
from mllm_cl.predictions import read_set, rows

# An option marker: "A." / "A)" / "(A)" / "A:" at a line start or after a space, followed by text.
_OPTION = re.compile(r"(?:^|[\s,])\(?([A-Z])[.:)]\s+\S", re.MULTILINE)


@dataclass(frozen=True)
class Level:
    """An eval set's baseline accuracy (a fraction) and how it was found."""

    value: float
    kind: str  # "chance" or "majority"
    detail: str  # e.g. "1/3 options", "'yes'"

    def describe(self) -> str:
        return f"{self.kind}, {self.detail}"


def option_count(prompt: str) -> int:
    """The number of options the prompt lists (0 when it lists none): letter lines A, B, C, ... in order,
    else a label set."""
    letters = {m.group(1) for m in _OPTION.finditer(prompt)}
    k = 0
    while chr(ord("A") + k) in letters:
        k += 1
    if k >= 2:
        return k
    labels = prompt_labels({"messages": [{"role": "user", "content": prompt}]})
    return len(labels) if labels and len(labels) >= 2 else 0


def _norm(text) -> str:
    return " ".join(str(text).lower().split())


def level(records: list[dict]) -> Level | None:
    """The chance or majority level of one eval set's prediction records (None without records)."""
    if not records:
        return None
    counts = [option_count(str(r.get("prompt", ""))) for r in records]
    if all(counts):
        value = sum(1 / k for k in counts) / len(counts)
        ks = sorted(set(counts))
        detail = f"1/{ks[0]} options" if len(ks) == 1 else f"mean of 1/k over {ks[0]}..{ks[-1]} options"
        return Level(value, "chance", detail)
    refs = [{_norm(a) for a in r.get("references") or []} for r in records]
    votes = Counter(a for answers in refs for a in answers)
    if not votes:
        return None
    top = min(votes, key=lambda a: (-votes[a], a))  # ties: alphabetical, so the level is stable
    return Level(votes[top] / len(records), "majority", repr(top))


def levels(run_dir: str) -> dict[str, Level]:
    """{eval set: its level} for every set with saved predictions in `run_dir` ({} when there are none)."""
    found: dict[str, Level] = {}
    for _, _, folder in rows(run_dir):
        for name in sorted(f[: -len(".jsonl")] for f in os.listdir(folder) if f.endswith(".jsonl")):
            if name not in found:
                lvl = level(list(read_set(folder, name).values()))
                if lvl is not None:
                    found[name] = lvl
    return found
