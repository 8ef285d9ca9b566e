"""Hand-checked cases for the answer metrics in mllm_cl.metrics."""

import pytest
import torch

from mllm_cl.metrics import (
    EMTClassification,
    ExactMatch,
    IntegerMatch,
    MultipleChoice,
    TimeMatch,
    VQAAccuracy,
    build_metric,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Three.", "3"),
        ("the Red", "red"),
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("10:30", "10:30"),
        ("It is 10.30.", "it is 10.30"),
        ("  Twenty  ", "20"),
        ("ninety", "90"),
        ("twenty-three apples", "23 apples"),
        ("1,000", "1000"),
        ("don't", "dont"),
        ("x-ray!", "x ray"),
        ("Yes, it is.", "yes it is"),
        ("theater", "theater"),  # articles are removed as words only
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_counts_any_reference():
    metric = ExactMatch()
    metric.update(["Three.", "the Red", "a dog", "cat"], ["3", "red", ["puppy", "Dog"], "dog"])
    assert metric.compute().item() == pytest.approx(3 / 4)
    assert metric.total.item() == 4


def _ten_refs(agreeing: int) -> list[str]:
    return ["cat"] * agreeing + ["dog"] * (10 - agreeing)


# By hand, with m of 10 humans agreeing: the m leave-one-out subsets without an agreeing
# human have m - 1 matches, the other 10 - m have m; each subset scores min(1, matches / 3).
@pytest.mark.parametrize(
    ("agreeing", "expected"),
    [
        (0, 0.0),
        (1, (1 * 0 + 9 * 1 / 3) / 10),  # 0.3
        (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # 0.6
        (3, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
        (4, (4 * 1 + 6 * 1) / 10),  # 1.0
        (7, 1.0),  # every subset keeps 6 or 7 agreeing humans: capped at 1, not 7/3 or 2
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_references(agreeing, expected):
    assert VQAAccuracy().score("Cat.", _ten_refs(agreeing)) == pytest.approx(expected)


def test_vqa_accuracy_fewer_references_and_batch_mean():
    metric = VQAAccuracy(allow_few_references=True)  # fewer than 3 references only on request
    assert metric.score("cat", ["cat", "a cat", "dog"]) == pytest.approx(2 / 3)
    assert metric.score("cat", ["cat", "cat", "cat", "dog"]) == pytest.approx(1.0)
    # More than 3 agreeing among fewer than 10: min(1, 4 / 3) and min(1, 9 / 3) are both 1.
    assert metric.score("cat", ["cat"] * 4 + ["dog"]) == 1.0
    assert metric.score("Cat.", ["cat"] * 9) == 1.0
    metric.update(["cat", "cat"], [["cat"] * 5, ["cat", "dog"]])  # capped 1 and 1/3
    assert metric.compute().item() == pytest.approx((1 + 1 / 3) / 2)
    metric.reset()
    metric.update(["cat", "cat"], [_ten_refs(2), _ten_refs(3)])
    assert metric.compute().item() == pytest.approx((0.6 + 0.9) / 2)


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("(b)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("Answer: B", "B"),
        ("The answer is B", "B"),
        ("The answer is (c).", "C"),
        ("I think the answer is C because it is red.", "C"),
        ("B. a red car", "B"),
        ("D) blue", "D"),
        ("C: blue", "C"),
        ("B cat", "B"),
        ("Option A is wrong; the correct option is D", "D"),
        ("The image shows (A) a dog", "A"),
        ("A cat is sitting on a mat", None),  # the article "A", not option A
        ("the answer is a cat", None),
        ("Blue", None),
        ("nothing useful", None),
        ("It is either (A) or (B)", None),  # ambiguous
    ],
)
def test_multiple_choice_extraction(text, letter):
    assert MultipleChoice().extract_choice(text) == letter


def test_multiple_choice_scores_and_counts_unparsed():
    metric = MultipleChoice()
    metric.update(["(B)", "The answer is C", "no idea", "A."], ["B", "(D)", "A", "A"])
    assert metric.compute().item() == pytest.approx(2 / 4)
    assert metric.unparsed.item() == 1


def test_multiple_choice_respects_choice_set():
    assert MultipleChoice(choices="ABCD").extract_choice("E") is None
    assert MultipleChoice(choices="ABCDE").extract_choice("E") == "E"


def test_integer_match():
    metric = IntegerMatch()
    preds = ["There are three squares.", "I count 4.", "3.5 then 4", "none", "seven"]
    metric.update(preds, ["3", "four", "4", "2", ["6", "7"]])
    assert metric.compute().item() == pytest.approx(4 / 5)
    assert metric.unparsed.item() == 1
    assert metric.score("5 cats", ["3"]) == 0.0


@pytest.mark.parametrize(
    ("pred", "ref", "tolerance", "expected"),
    [
        ("10:30", "10:30", 1, 1.0),
        ("It is 3:05 pm.", "3:04", 1, 1.0),
        ("3:07", "3:05", 1, 0.0),
        ("3:07", "3:05", 2, 1.0),
        ("10.30", "10:30 am", 1, 1.0),
        ("10:59", "11:00", 1, 1.0),  # one minute apart across the hour
        ("10:00", "10:59", 1, 0.0),  # same hour but 59 minutes apart
        ("11:59 pm", "12:00", 1, 1.0),  # wraps around the dial
        ("15:30", "3:30", 1, 1.0),  # hours compared mod 12
        ("4:30", "3:30", 1, 0.0),
        ("no clock", "3:30", 1, 0.0),
    ],
)
def test_time_match_score(pred, ref, tolerance, expected):
    assert TimeMatch(tolerance=tolerance).score(pred, [ref]) == expected


def test_time_match_parts():
    metric = TimeMatch()
    # hour ok/minute ok/both ok; hour wrong/minute ok/both ok (wrap); hour ok/minute ok
    # (circular 59 vs 00)/both wrong; hour ok/minute wrong; unparsed.
    metric.update(["3:05", "10:59", "10:00", "3:40", "soon"], ["3:05", "11:00", "10:59", "3:10", "1:00"])
    parts = metric.compute_parts()
    assert parts["hour"].item() == pytest.approx(3 / 5)
    assert parts["minute"].item() == pytest.approx(3 / 5)
    assert parts["both"].item() == pytest.approx(2 / 5)
    assert metric.compute().item() == pytest.approx(2 / 5)
    assert metric.unparsed.item() == 1


def test_emt_classification_matching():
    metric = EMTClassification(labels=["cat", "dog", "hot dog"])
    assert metric.match_label("Dog.") == "dog"
    assert metric.match_label("It's a cat in the picture") == "cat"
    assert metric.match_label("This is a hot dog") == "hot dog"  # "dog" is inside "hot dog"
    assert metric.match_label("a cat or a dog") is None  # ambiguous
    assert metric.match_label("a bird") is None
    assert metric.match_label("catalogue") is None  # whole words only


def test_emt_classification_update():
    metric = EMTClassification(labels=["cat", "dog", "bird"])
    metric.update(["Dog.", "a cat", "cat and dog", "fish"], ["dog", "dog", "cat", "bird"])
    assert metric.compute().item() == pytest.approx(1 / 4)
    assert metric.unmatched.item() == 2
    metric.update(["Sparrow"], ["sparrow"], labels=[["sparrow", "eagle"]])
    assert metric.compute().item() == pytest.approx(2 / 5)


def test_emt_classification_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        EMTClassification().update(["cat"], ["cat"])


def test_reset_and_empty_compute():
    metric = ExactMatch()
    assert metric.compute().item() == 0.0
    metric.update(["a", "b"], ["a", "c"])
    metric.update(["x"], ["x"])
    assert metric.compute().item() == pytest.approx(2 / 3)
    metric.reset()
    assert metric.total.item() == 0 and metric.correct.item() == 0.0
    metric.update(["y"], ["z"])
    assert metric.compute().item() == 0.0


def test_reset_clears_extra_counters():
    metric = MultipleChoice()
    metric.update(["???"], ["A"])
    metric.reset()
    assert metric.unparsed.item() == 0


def test_forward_returns_batch_value_and_accumulates():
    metric = ExactMatch()
    assert metric(["a", "b"], ["a", "a"]).item() == pytest.approx(0.5)
    assert metric(["c"], ["c"]).item() == pytest.approx(1.0)
    assert metric.compute().item() == pytest.approx(2 / 3)
    assert isinstance(metric.compute(), torch.Tensor)


def test_update_rejects_bad_inputs():
    with pytest.raises(ValueError, match="targets"):
        ExactMatch().update(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        ExactMatch().update("abc", ["a", "b", "c"])


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("exact_match", ExactMatch),
        ("vqa", VQAAccuracy),
        ("multiple_choice", MultipleChoice),
        ("integer", IntegerMatch),
        ("time", TimeMatch),
        ("emt", EMTClassification),
    ],
)
def test_build_metric(name, cls):
    assert type(build_metric(name)) is cls


def test_build_metric_kwargs_and_unknown():
    assert build_metric("time", tolerance=5).tolerance == 5
    assert build_metric("emt", labels=["a"]).labels == ["a"]
    with pytest.raises(ValueError, match="exact_match.*emt"):
        build_metric("bleu")
