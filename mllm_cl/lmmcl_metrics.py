"""The metrics of LMM_CL's five target tasks (CUB-200, PixMo-Count, PathVQA, TimeClock), as its
lmms-eval tasks compute them (TextVQA uses ``vqa``). Facts from /work/shared/BENCHMARKS.md §1; the
code is ours. Each rule sees the stripped generated answer; upstream bugs we do not copy are named
in the class docstrings.
"""

from __future__ import annotations

import re
from collections import Counter

from mllm_cl.answer_metric import AnswerMetric

_CUB_LETTER = re.compile(r"\b([A-Za-z])[.)]?\b")


def cub_letter(prediction: str) -> str:
    """LMM_CL's CUB-200 answer letter: the first one-letter word, else the first character if it
    is a letter, else the whole answer; lower-cased."""
    pred = prediction.strip()
    match = _CUB_LETTER.search(pred)
    if match:
        return match.group(1).lower()
    return pred[0].lower() if pred[:1].isalpha() else pred.lower()


class CUBLetter(AnswerMetric):
    """CUB-200 (LMM_CL ``acc``): :func:`cub_letter` of the answer equals the lower-cased letter.

    Any of the 26 letters counts, so a question with options A-Z answered "M" scores 1.
    """

    def score(self, prediction: str, references: list[str]) -> float:
        pred = cub_letter(prediction)
        return float(any(pred == r.lower() for r in references))


_COUNT_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
_COUNT_WORD = re.compile(rf"\b({'|'.join(_COUNT_WORDS)})\b")


def parse_count(text: str) -> int | None:
    """The count in ``text``: lower-case, drop periods, number words zero..twenty -> digits (as whole
    words), then the first run of digits; None when there is none."""
    text = _COUNT_WORD.sub(lambda m: str(_COUNT_WORDS.index(m.group(1))), text.lower().replace(".", ""))
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


class PixMoCount(AnswerMetric):
    """PixMo-Count (LMM_CL ``pixmocount_accuracy``): :func:`parse_count` of answer and reference agree.

    Deliberate difference (intended rule): LMM_CL replaces number words as substrings, in the
    order zero..twenty, so "none" reads as 1 ("n" + "one"), "eighteen" as 8 and "often" as
    "of10". We replace whole words only: "none" has no number (scores 0), "eighteen" is 18.
    An answer (or reference) without a number scores 0, as upstream.
    """

    def score(self, prediction: str, references: list[str]) -> float:
        pred = parse_count(prediction.strip())
        return float(pred is not None and any(pred == parse_count(r) for r in references))


def _words(text: str) -> Counter:
    # PathVQA's official tokenisation: letters and spaces only (digits vanish), lower-cased.
    return Counter(re.sub("[^a-zA-Z ]", "", text).lower().split())


def pathvqa_token_ratio(prediction: str, reference: str) -> float:
    """PathVQA's "exact match": distinct reference words found in the answer / answer words."""
    pred, ref = _words(prediction), _words(reference)
    total = sum(pred.values())
    return sum(1 for w in ref if w in pred) / total if total else 0.0


def pathvqa_f1(prediction: str, reference: str) -> float:
    """PathVQA's token F1: shared words counted with the answer's multiplicity for both
    precision and recall; recall's misses counted with the reference's."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return 0.0
    tp = sum(c for w, c in pred.items() if w in ref)
    if tp == 0:
        return 0.0
    precision = tp / sum(pred.values())
    recall = tp / (tp + sum(c for w, c in ref.items() if w not in pred))
    return 2 * precision * recall / (precision + recall)


_YES_NO_STARTS = tuple(
    "is |are |was |were |does |do |did |can |could |would |should |has |have |had |will |shall |am i ".split(
        "|"
    )
)


def is_yes_no_question(question: str) -> bool:
    """LMM_CL's binary-question test: the question starts with is/are/was/does/can/has/... ."""
    return question.lower().strip().startswith(_YES_NO_STARTS)


class PathVQA(AnswerMetric):
    """PathVQA as LMM_CL scores it; headline ``exact_match``, the official token ratio (it is not
    string equality: distinct reference words in the answer / answer words).

    Parts: ``exact_match``, ``f1`` (token F1) and ``binary`` (answer equals the reference, case
    and outer spaces ignored) over the yes/no questions only; the latter needs the per-sample
    field ``question`` (the dataset's question, without the prompt). Scored against the first
    reference (PathVQA has one). BLEU-1/2/3, also logged upstream, are not computed.
    """

    sample_fields = ("question",)
    part_names = ("exact_match", "f1", "binary")

    def score_sample(self, prediction: str, references: list[str], question: str | None = None) -> dict:
        pred, ref = prediction.strip(), references[0] if references else ""
        ratio = pathvqa_token_ratio(pred, ref)
        out = {"score": ratio, "exact_match": ratio, "f1": pathvqa_f1(pred, ref)}
        if question is not None and is_yes_no_question(question):
            out["binary"] = float(pred.lower().strip() == ref.lower().strip())
        return out


def parse_clock(text: str) -> tuple[int, int] | None:
    """LMM_CL's ``parse_time``: periods dropped, then the first "H:M" (1-2 digits each), else the
    first two numbers as hour and minute; None when neither is there."""
    text = text.lower().replace(".", "")
    match = re.search(r"(\d{1,2}):(\d{1,2})", text)
    if match:
        return int(match.group(1)), int(match.group(2))
    numbers = re.findall(r"\d+", text)
    return (int(numbers[0]), int(numbers[1])) if len(numbers) >= 2 else None


class TimeClock(AnswerMetric):
    """TimeClock (LMM_CL, after ItsAboutTime): headline ``both``; parts ``hour`` (hours equal, no
    12-hour folding), ``minute`` (within 1 minute, or exactly 59 apart: 0 vs 59),
    ``both`` and ``unparsed`` (share of answers without a time; they score 0 on all three).
    Scored against the first reference (the set has one).
    """

    part_names = ("hour", "minute", "both", "unparsed")

    def score_sample(self, prediction: str, references: list[str]) -> dict[str, float]:
        pred = parse_clock(prediction.strip())
        ref = parse_clock(references[0]) if references else None
        hour = minute = False
        if pred is not None and ref is not None:
            hour = pred[0] == ref[0]
            minute = abs(pred[1] - ref[1]) <= 1 or abs(pred[1] - ref[1]) == 59
        both = float(hour and minute)
        return {"score": both, "hour": float(hour), "minute": float(minute), "both": both,
                "unparsed": float(pred is None)}  # fmt: skip


LMMCL_METRICS: dict[str, type[AnswerMetric]] = {
    "cub_letter": CUBLetter,
    "pixmocount": PixMoCount,
    "pathvqa": PathVQA,
    "timeclock": TimeClock,
}
