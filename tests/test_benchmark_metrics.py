"""The papers' benchmark metrics on cases computed by hand from the formulas in BENCHMARKS.md."""

from __future__ import annotations

import math
import string

import pytest
import torch

from mllm_cl.benchmark_metrics import evalai_normalize, levenshtein
from mllm_cl.lmmcl_metrics import parse_clock, parse_count
from mllm_cl.metrics import MultipleChoice, build_metric, prompt_letters

CUB_PROMPT = (
    "What species is the bird in this photo?\nAnswer with the option's letter from the given choices directly.\n"
    + "\n".join(f"{letter}. bird {letter.lower()}" for letter in string.ascii_uppercase)
)


def run(name: str, preds, refs, metric_args=None, **fields):
    metric = build_metric(name, **(metric_args or {}))
    metric.update(preds, refs, **fields)
    return metric


# ---- multiple_choice: letters from the prompt -----------------------------------------------------


def test_multiple_choice_26_options_answered_m_scores_1():
    metric = run(
        "multiple_choice", ["M", "The answer is (Z).", "E"], [["M"], ["Z"], ["E"]], prompt=[CUB_PROMPT] * 3
    )
    assert metric.compute().item() == 1.0
    assert prompt_letters(CUB_PROMPT) == string.ascii_uppercase


def test_multiple_choice_only_letters_listed_in_each_prompt():
    four = "Q?\nA. cat\nB. dog\nC. cow\nD. hen\nAnswer with the option's letter."
    metric = run("multiple_choice", ["E", "D", "M"], ["E", "D", "M"], prompt=[four, four, None])
    # "E" is not an option of a 4-option prompt (unparsed); "M" without options falls back to A-Z.
    assert metric.compute().item() == pytest.approx(2 / 3)
    assert metric.compute_parts()["unparsed"].item() == pytest.approx(1 / 3)
    assert MultipleChoice(choices="ABCD").extract_choice("M", prompt=CUB_PROMPT) is None  # explicit wins


def test_multiple_choice_score_sample_reports_unparsed():
    assert MultipleChoice().score_sample("no idea", ["A"], prompt=CUB_PROMPT) == {
        "score": 0.0,
        "unparsed": 1.0,
    }


# ---- vqa: EvalAI normalisation, 10 references, leave-one-out --------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),
        ("The Cat's toy?", "cat 's toy"),
        ("dont", "don't"),
        ("x-ray", "x ray"),  # a mark touching no space splits
        ("x - ray", "x ray"),  # a mark next to a space is deleted
        ("1.5", "1.5"),
        ("none", "0"),
        ("an apple", "apple"),
        ("1,000", "1000"),
    ],
)
def test_evalai_normalize(raw, expected):
    assert evalai_normalize(raw) == expected


def test_vqa_ten_references_leave_one_out_by_hand():
    refs = ["2", "two", "2 ", "3", "three", "3", "3", "3", "3", "3"]  # 3 humans say 2 after normalising
    # Leaving out one of the 3 agreeing humans leaves 2 -> 2/3 (3 subsets); the other 7 keep 3 -> 1.
    expected = (3 * (2 / 3) + 7 * 1.0) / 10
    metric = run("vqa", ["Two."], [refs])
    assert metric.compute().item() == pytest.approx(expected) == pytest.approx(0.9)
    refs_one = ["2"] + ["3"] * 9  # one human: 9 subsets with 1 match -> 1/3, one with 0
    assert metric.score("2", refs_one) == pytest.approx(9 * (1 / 3) / 10)


def test_vqa_single_reference_set_stops_with_one_line():
    metric = build_metric("vqa")
    with pytest.raises(ValueError, match="fewer than 3 reference answers") as err:
        metric.update(["cat", "cat"], [["cat"] * 10, ["cat"]])
    assert "\n" not in str(err.value) and "allow_few_references" in str(err.value)
    with pytest.raises(ValueError, match="1 of 1 samples"):
        metric.validate_references([["cat"]])
    assert metric.total.item() == 0  # nothing was scored


def test_vqa_few_references_only_when_asked():
    metric = run("vqa", ["cat"], [["cat"]], {"allow_few_references": True})
    assert metric.compute().item() == pytest.approx(1 / 3)


# ---- ANLS -----------------------------------------------------------------------------------------


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3


@pytest.mark.parametrize(
    ("pred", "refs", "expected"),
    [
        ("hello  world", ["Hello World"], 1.0),  # case and whitespace normalised
        ("helo world", ["Hello World"], 1 - 1 / 11),
        ("abc", ["abcdef"], 0.5),  # exactly tau: kept
        ("ab", ["abcdef"], 0.0),  # 1 - 4/6 < 0.5
        ("a c", ["a  b"], 1 - 1 / 4),  # length of the un-normalised reference "a  b" (4), not "a b" (3)
        ("ab", ["xyz", "abc"], 1 - 1 / 3),  # best reference
    ],
)
def test_anls_by_hand(pred, refs, expected):
    assert build_metric("anls").score(pred, refs) == pytest.approx(expected)


def test_anls_mean():
    metric = run("anls", ["abc", "ab"], [["abcdef"], ["abcdef"]])
    assert metric.compute().item() == pytest.approx((0.5 + 0.0) / 2)


# ---- ChartQA relaxed accuracy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        ("12", "12.5", 1.0),  # |12 - 12.5| / 12.5 = 0.04
        ("13.2", "12.5", 0.0),  # 0.056
        ("5%", "0.05", 1.0),  # "x%" -> x / 100
        ("0.049", "5%", 1.0),  # 0.02
        ("0", "0", 1.0),  # a zero target needs string equality
        ("0.0", "0", 0.0),
        ("Yes", "yes", 1.0),
        ("Yes.", "yes", 0.0),
    ],
)
def test_relaxed_accuracy(pred, target, expected):
    assert build_metric("relaxed_accuracy").score(pred, [target]) == expected


def test_relaxed_accuracy_human_and_augmented_splits():
    metric = run(
        "relaxed_accuracy",
        ["10", "7", "3"],
        ["10", "9", "3"],
        type=["human_test", "human_test", "augmented_test"],
    )
    assert metric.compute().item() == pytest.approx(2 / 3)
    parts = metric.compute_parts()
    assert parts["human"].item() == pytest.approx(1 / 2) and parts["augmented"].item() == 1.0


# ---- OCRBench ---------------------------------------------------------------------------------------


def test_ocrbench_containment_and_sum_over_n():
    preds = ["The sign says HELLO world", "x ^ {2}", "X^{2}", "nothing", "ab"]
    refs = [["hello"], ["x^{2}"], ["x^{2}"], ["cat", "dog"], ["zz", "A"]]
    datasets = ["IIIT5K", "HME100k", "HME100k", "IIIT5K", "IIIT5K"]
    metric = run("ocrbench", preds, refs, dataset=datasets)
    # 1 (case-folded), 1 (spaces removed), 0 (HME100k keeps case), 0, 1 (any reference) -> 3 / 5
    assert metric.compute().item() == pytest.approx(3 / 5)


# ---- MMStar -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("B", "B", 1.0),
        ("(b) a cat", "B", 1.0),
        ("Option C", "C", 1.0),
        ("The answer is D.", "D", 1.0),
        ("Answer: B", "B", 0.0),  # first character "a" is not "b"; no recognised prefix
        ("", "A", 0.0),
    ],
)
def test_mmstar_letter_rule(pred, gold, expected):
    assert build_metric("mmstar").score(pred, [gold]) == expected


def test_mmstar_macro_mean_over_l2_categories():
    l2 = ["image emotion"] * 3 + ["geometry"]
    metric = run("mmstar", ["A", "B", "C", "D"], ["A", "B", "A", "D"], l2_category=l2)
    # image emotion 2/3, geometry 1/1: macro (2/3 + 1) / 2 = 5/6 (the micro mean would be 3/4).
    assert metric.compute().item() == pytest.approx(5 / 6)
    parts = metric.compute_parts()
    assert parts["coarse perception"].item() == pytest.approx(2 / 3)
    assert parts["math"].item() == 1.0
    assert math.isnan(parts["logical reasoning"].item())  # no sample of that category
    assert set(parts) == {
        "coarse perception", "fine-grained perception", "instance reasoning",
        "logical reasoning", "science & technology", "math",
    }  # fmt: skip


def test_mmstar_needs_a_known_l2_category():
    with pytest.raises(ValueError, match="l2_category 'colours'"):
        run("mmstar", ["A"], ["A"], l2_category=["colours"])
    with pytest.raises(ValueError, match="l2_category None"):
        run("mmstar", ["A"], ["A"])


def test_mmstar_forward_keeps_the_running_macro_mean():
    metric = build_metric("mmstar")
    batch = metric(["A", "B"], ["A", "A"], l2_category=["geometry", "recognition"])
    assert batch.item() == pytest.approx((1.0 + 0.0) / 2)
    metric(["A"], ["A"], l2_category=["recognition"])
    assert metric.compute().item() == pytest.approx((1.0 + 0.5) / 2)


# ---- LMM_CL PathVQA ---------------------------------------------------------------------------------


def test_pathvqa_token_ratio_f1_and_binary():
    metric = build_metric("pathvqa")
    assert metric.score_sample("yes", ["yes"], question="Is this a tumor?") == {
        "score": 1.0, "exact_match": 1.0, "f1": 1.0, "binary": 1.0,
    }  # fmt: skip
    # 1 distinct reference word among 3 answer words; F1: precision 1/3, recall 1 -> 0.5.
    got = metric.score_sample("the tumor cells", ["tumor"], question="What is shown?")
    assert got["score"] == pytest.approx(1 / 3) and got["f1"] == pytest.approx(0.5) and "binary" not in got
    # Repeated words: ratio 1/2; F1 counts the answer's multiplicity on both sides -> 1.
    got = metric.score_sample("cells cells", ["cells"], question="What are these?")
    assert got["score"] == pytest.approx(1 / 2) and got["f1"] == 1.0
    assert metric.score_sample("grade 3", ["grade"])["score"] == 1.0  # digits are not tokens


def test_pathvqa_binary_mean_only_over_yes_no_questions():
    preds, refs = ["yes", "No.", "tumor"], ["yes", "yes", "tumor"]
    questions = ["Is this a tumor?", "Does it show necrosis?", "What is this?"]
    metric = run("pathvqa", preds, refs, question=questions)
    parts = metric.compute_parts()
    assert parts["binary"].item() == pytest.approx(1 / 2)  # "no." != "yes"; the open question is skipped
    assert metric.compute().item() == pytest.approx(2 / 3) == parts["exact_match"].item()
    assert parts["f1"].item() == pytest.approx(2 / 3)


# ---- LMM_CL TimeClock -------------------------------------------------------------------------------


def test_parse_clock():
    assert parse_clock("It is 3:45.") == (3, 45)
    assert parse_clock("3 45") == (3, 45)  # first two numbers
    assert parse_clock("3.45") is None  # periods dropped: "345" is one number
    assert parse_clock("noon") is None


def test_timeclock_hour_minute_both():
    preds = ["3:45", "3:44", "4:00", "15:45", "no idea"]
    refs = ["3:45", "3:45", "3:59", "3:45", "3:45"]
    metric = run("timeclock", preds, refs)
    parts = metric.compute_parts()
    # hour: 3 = 3, 3 = 3, 4 != 3, 15 != 3 (no 12-hour folding), unparsed -> 2/5
    assert parts["hour"].item() == pytest.approx(2 / 5)
    # minute: 0, 1, |0 - 59| = 59 counts, 0, unparsed -> 4/5
    assert parts["minute"].item() == pytest.approx(4 / 5)
    assert parts["both"].item() == pytest.approx(2 / 5) == metric.compute().item()
    assert parts["unparsed"].item() == pytest.approx(1 / 5)


# ---- Letter rules: SEED, AI2D, ScienceQA, RealWorldQA, CUB -------------------------------------------


@pytest.mark.parametrize(
    ("name", "pred", "gold", "expected"),
    [
        ("seed_letter", "B. A dog", "B", 1.0),
        ("seed_letter", "b", "B", 1.0),
        ("seed_letter", "The answer is B", "B", 0.0),  # first character only
        ("ai2d_letter", "C. leaf", "C", 1.0),
        ("ai2d_letter", "c", "C", 1.0),
        ("ai2d_letter", "(C)", "C", 1.0),  # punctuation ignored
        ("ai2d_letter", "The answer is C", "C", 0.0),  # no leading "C.": the whole answer is compared
        ("scienceqa_letter", "B", "B", 1.0),
        ("scienceqa_letter", "b", "B", 1.0),
        ("scienceqa_letter", "B. moss", "B", 1.0),  # intended rule; v0.3.0 scores 0 (lower-casing bug)
        ("scienceqa_letter", "b. moss", "B", 0.0),
        ("cub_letter", "M", "M", 1.0),
        ("cub_letter", "The answer is M.", "M", 1.0),
        ("cub_letter", "m) Cardinal", "M", 1.0),
        ("cub_letter", "A bird, M", "M", 0.0),  # the first one-letter word is "A"
        ("cub_letter", "7", "M", 0.0),
    ],
)
def test_letter_rules(name, pred, gold, expected):
    assert build_metric(name).score(pred, [gold]) == expected


RWQA_Q = "Which lane is the car in?\nA. 2 lanes\nB. Three lanes\nC. left\nPlease answer directly with only the letter of the correct option and nothing else."


@pytest.mark.parametrize(
    ("pred", "prompt", "gold", "expected"),
    [
        ("Three lanes", RWQA_Q, "B", 1.0),  # option text -> its letter
        ("left lane", RWQA_Q, "C", 1.0),
        ("B.", RWQA_Q, "B", 1.0),
        ("The answer is B", RWQA_Q, "B", 0.0),
        ("two", "How many cars are there? Answer with a number.", "2", 1.0),  # number word alone
        ("two cars", "How many cars are there? Answer with a number.", "2", 0.0),
    ],
)
def test_realworldqa_filters(pred, prompt, gold, expected):
    assert build_metric("realworldqa").score(pred, [gold], prompt=prompt) == expected


# ---- LMM_CL PixMo-Count -----------------------------------------------------------------------------


def test_parse_count_whole_words_only():
    assert parse_count("There are eighteen birds.") == 18  # upstream's substring rule reads 8
    assert parse_count("none") is None  # upstream reads "n" + "one" = 1
    assert parse_count("Someone sees 4 dogs") == 4  # upstream: "some1" -> 1
    assert parse_count("Three.") == 3


def test_pixmocount_accuracy():
    preds = ["18", "none", "3", "There are three."]
    refs = [
        "There are eighteen birds in this image.",
        "There is 1 bird in this image.",
        "3",
        "There are 4 cats.",
    ]
    assert run("pixmocount", preds, refs).compute().item() == pytest.approx(2 / 4)


# ---- the contract --------------------------------------------------------------------------------


def test_every_benchmark_metric_is_registered_and_scores_samples():
    names = ["anls", "relaxed_accuracy", "ocrbench", "mmstar", "seed_letter", "ai2d_letter", "scienceqa_letter",
             "realworldqa", "cub_letter", "pixmocount", "pathvqa", "timeclock", "vqa", "multiple_choice"]  # fmt: skip
    for name in names:
        metric = build_metric(name)
        fields = {f: ["geometry" if f == "l2_category" else "x"] for f in metric.sample_fields}
        refs = [["a"] * 10]
        sample = metric.score_sample("a", refs[0], **{k: v[0] for k, v in fields.items()})
        metric.update(["a"], refs, **fields)
        assert isinstance(metric.compute(), torch.Tensor) and 0.0 <= sample["score"] <= 1.0, name
        assert set(metric.compute_parts()) <= set(metric.part_names) | {
            "coarse perception", "fine-grained perception", "instance reasoning",
            "logical reasoning", "science & technology", "math",
        }, name  # fmt: skip


def test_update_rejects_undeclared_and_misaligned_fields():
    with pytest.raises(TypeError, match="got fields \\['question'\\]"):
        build_metric("anls").update(["a"], ["a"], question=["q"])
    with pytest.raises(ValueError, match="field 'type' has 2 values for 1 predictions"):
        build_metric("relaxed_accuracy").update(["a"], ["a"], type=["human_test", "x"])


def test_parts_sum_across_updates_and_reset():
    metric = build_metric("timeclock")
    metric.update(["3:45"], ["3:45"])
    metric.update(["x"], ["3:45"])
    assert metric.compute_parts()["unparsed"].item() == pytest.approx(1 / 2)
    metric.reset()
    assert math.isnan(metric.compute_parts()["hour"].item()) and metric.compute().item() == 0.0
