"""Diagnostic metrics: what a model's wrong answers say about what it learnt.

`ClassnameMisChoice` is the class-name mis-choice diagnostic of Li et al., "Fine-tuning MLLMs Without
Forgetting Is Easier Than You Think" (ImageWikiQA: 4-option questions about the object in an
ImageNet image, with the image's class name planted as a wrong option; a model that over-fits to
ImageNet classification picks it). As their `evaluators/mix_cls_result_matcher.py` scores it:

* the answer: the prediction stripped, cut to the text after its last ``:``, upper-cased; it chooses
  option X when it equals X or starts with ``X.``; it is correct when X is the reference letter;
* the class option: the first option (in prompt order) whose text contains the sample's class name,
  case-insensitively;
* ``classname_share`` = answers choosing the class option / wrong answers, over the samples that carry
  a ``classname`` field and whose prompt has a class option (their "percentage of class name
  misclassifications in wrong choices"); ``classname_picked`` = the same count / those samples.

The headline value is the accuracy over every sample, so the column stays an accuracy; the two
shares are parts (TensorBoard ``parts/<set>/classname_share``). Deliberate differences: the class
name is the sample's own ``classname`` field (upstream finds it by matching 3 of 4 option lines
against the dataset and silently keeps the last entry when none match), and options are read from
the prompt's ``X. text`` lines (upstream takes fixed line positions ``[-6:-2]`` of the rendered
prompt, which depend on the chat template). Per-sample fields reach `update` as keyword lists; a
batch mixing samples with and without ``classname`` loses the field for that batch
(`mllm_cl.evaluation.ColumnScorer`), so keep such sets homogeneous.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torchmetrics

_OPTION = re.compile(r"^\s*([A-Z])\.\s*(.*?)\s*$")


def chosen_letter(prediction: str, letters: Sequence[str]) -> str | None:
    """The option letter a prediction chooses, by upstream's rule (see the module docstring)."""
    text = prediction.strip()
    if ":" in text:
        text = text.split(":")[-1].strip()
    text = text.upper()
    return next((x for x in letters if text == x or text.startswith(f"{x}.")), None)


def options(prompt: str) -> dict[str, str]:
    """{letter: option text} of the prompt's ``A. ...`` lines, in order."""
    found = {}
    for line in prompt.splitlines():
        match = _OPTION.match(line)
        if match and match.group(1) not in found:
            found[match.group(1)] = match.group(2)
    return found


def class_option(prompt: str, classname: str) -> str | None:
    """The letter of the first option naming `classname` (case-insensitive substring), or None."""
    name = classname.strip().upper()
    return next((x for x, text in options(prompt).items() if name and name in text.upper()), None)


class ClassnameMisChoice(torchmetrics.Metric):
    """Multiple-choice accuracy plus the share of wrong answers that pick the option naming the class.

    Samples need their prompt and a ``classname`` field (``sample["fields"]["classname"]``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    sample_fields = ("prompt", "classname")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        for name in ("total", "with_class", "wrong_with_class", "picked_class"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")

    def score_sample(
        self,
        prediction: str,
        references: Sequence[str],
        prompt: str | None = None,
        classname: str | None = None,
    ) -> dict[str, float | None]:
        """{"score": 1/0, "picked_classname": 1/0, or None without a class option}."""
        letters = list(options(prompt or "")) or list("ABCD")
        choice = chosen_letter(prediction, letters)
        refs = [references] if isinstance(references, str) else list(references)
        correct = choice is not None and choice in {r.strip().upper() for r in refs}
        target = class_option(prompt or "", classname) if classname else None
        return {
            "score": float(correct),
            "picked_classname": None if target is None else float(choice == target),
        }

    def update(
        self,
        preds: Sequence[str],
        targets: Sequence[str | Sequence[str]],
        prompt: Sequence[str] | None = None,
        classname: Sequence[str | None] | None = None,
    ) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets")
        prompts = prompt if prompt is not None else [None] * len(preds)
        names = classname if classname is not None else [None] * len(preds)
        for pred, refs, text, name in zip(preds, targets, prompts, names, strict=True):
            one = self.score_sample(pred, refs, text, name)
            self.correct += one["score"]
            self.total += 1
            if one["picked_classname"] is not None:
                self.with_class += 1
                self.wrong_with_class += int(one["score"] == 0.0)
                self.picked_class += int(one["picked_classname"])

    def validate_references(self, references: list[list[str]]) -> None:
        """Any letter reference can be scored (the evaluation loop's contract, see AnswerMetric)."""

    def compute(self) -> torch.Tensor:
        return self.correct / self.total if self.total > 0 else torch.zeros((), device=self.correct.device)

    def compute_parts(self) -> dict[str, torch.Tensor]:
        """accuracy, classname_share (of wrong answers) and classname_picked (of samples); NaN when empty."""
        with self.sync_context():
            nan = torch.tensor(math.nan, device=self.correct.device)
            share = self.picked_class / self.wrong_with_class if self.wrong_with_class > 0 else nan
            picked = self.picked_class / self.with_class if self.with_class > 0 else nan
            return {"accuracy": self.compute(), "classname_share": share, "classname_picked": picked}
