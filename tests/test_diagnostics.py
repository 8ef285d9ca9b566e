"""Li et al.'s class-name mis-choice diagnostic (mllm_cl/diagnostics.py): hand-computed cases following
their evaluators/mix_cls_result_matcher.py, and the per-sample `classname` field reaching the metric
through the real evaluation path on a tiny model."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from mllm_cl.diagnostics import ClassnameMisChoice, chosen_letter, class_option
from mllm_cl.evaluation import ColumnScorer, EvalColumn, prompt_batches
from mllm_cl.metrics import build_metric
from mllm_cl.module import MLLMModule

PROMPT = (
    "In which ocean region is this animal most commonly kept as a pet?\n"
    "A. Paris\nB. Goldfish\nC. Rome\nD. Berlin\nChoose A, B, C, or D."
)


def test_letter_rule_is_upstreams():
    letters = list("ABCD")
    assert chosen_letter("B", letters) == "B"
    assert chosen_letter("  b. goldfish", letters) == "B"  # upper-cased, starts with "B."
    assert chosen_letter("Answer: C.", letters) == "C"  # the text after the last ":"
    assert chosen_letter("(B)", letters) is None  # upstream accepts only "B" or "B..."
    assert chosen_letter("B) goldfish", letters) is None
    assert chosen_letter("The answer is B", letters) is None
    assert class_option(PROMPT, "goldfish") == "B" and class_option(PROMPT, "GOLDFISH ") == "B"
    assert class_option(PROMPT, "shark") is None


def test_share_of_wrong_answers_picking_the_class_option_by_hand():
    metric = build_metric("classname_mischoice")
    assert isinstance(metric, ClassnameMisChoice)
    preds = ["B", "A", "Answer: C.", "b. goldfish", "(B)", "B", "D"]
    targets = ["A", "A", "A", "A", ["A"], "C", "A"]
    classnames = ["goldfish"] * 5 + [None, "shark"]  # no class name; a class name no option holds
    metric.update(preds, targets, prompt=[PROMPT] * 7, classname=classnames)
    # accuracy: only sample 2 is right -> 1/7. With a class option: samples 1-5; wrong: 1, 3, 4, 5;
    # picking B (the goldfish option): 1 and 4 -> share 2/4, picked 2/5.
    assert float(metric.compute()) == pytest.approx(1 / 7)
    parts = {k: float(v) for k, v in metric.compute_parts().items()}
    assert parts == pytest.approx({"accuracy": 1 / 7, "classname_share": 0.5, "classname_picked": 0.4})
    assert metric.score_sample("B", ["A"], PROMPT, "goldfish") == {"score": 0.0, "picked_classname": 1.0}
    assert metric.score_sample("A", ["A"], PROMPT, None) == {"score": 1.0, "picked_classname": None}
    empty = ClassnameMisChoice()
    empty.update(["A"], ["A"], prompt=[PROMPT], classname=["goldfish"])  # right: no wrong answers
    assert math.isnan(float(empty.compute_parts()["classname_share"]))


def test_classname_field_reaches_the_metric_through_evaluation():
    module = MLLMModule(family="llava", tiny="tiny", max_new_tokens=3)
    module.configure_model()
    image = Image.new("RGB", (32, 32), (200, 120, 10))
    samples = [
        {
            "id": str(i),
            "images": [image],
            "messages": [{"role": "user", "content": "<image>\n" + PROMPT}],
            "answers": ["A"],
            "fields": {"classname": "goldfish"},
        }
        for i in range(3)
    ]
    scorer = ColumnScorer(EvalColumn("wikiqa", samples, "classname_mischoice", max_new_tokens=3))
    for batch in prompt_batches(module, samples, batch_size=2):
        scorer.add(module, batch)
    result = scorer.result()
    assert int(scorer.metric.with_class) == 3  # every sample's classname arrived
    by_hand = [r["prediction"].strip().split(":")[-1].strip().upper() for r in scorer.records]
    assert [r["picked_classname"] for r in scorer.records] == [
        float(p == "B" or p.startswith("B.")) for p in by_hand
    ]
    assert set(result.parts) == {"accuracy", "classname_share", "classname_picked"} and result.samples == 3
