"""Answer metrics: torchmetrics that score generated free-text answers against reference answers.

Generic metrics live here; the papers' benchmark rules in ``mllm_cl.benchmark_metrics`` (held-out
sets, VQA) and ``mllm_cl.lmmcl_metrics`` (LMM_CL's target tasks); the base
class and its contract with the evaluation loop in ``mllm_cl.answer_metric``. ``build_metric`` is
the one registry of names.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence

import torch

from mllm_cl.answer_metric import AnswerMetric, Targets
from mllm_cl.benchmark_metrics import BENCHMARK_METRICS, VQAAccuracy
from mllm_cl.diagnostics import ClassnameMisChoice
from mllm_cl.lmmcl_metrics import LMMCL_METRICS

_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"
_TENS_WORDS = "thirty forty fifty sixty seventy eighty ninety"
_NUMBER_WORDS = dict(zip(_UNITS.split(), range(21), strict=True))
_NUMBER_WORDS.update(zip(_TENS_WORDS.split(), range(30, 100, 10), strict=True))
_TENS = set(range(20, 100, 10))
_ARTICLES = {"a", "an", "the"}
_APOSTROPHES = re.compile("['‘’`]")
# Any punctuation except "." or ":" between digits, which marks decimals (3.5) and times (10:30).
_PUNCTUATION = re.compile(rf"(?!(?<=\d)[.:](?=\d))[{re.escape(string.punctuation)}“”…–—«»¿¡]")


def _strip_punctuation(text: str) -> str:
    # Thousands separators carry no meaning for matching: "1,000" must equal "1000".
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    # Apostrophes join ("don't" -> "dont"); other marks split ("x-ray" -> "x ray").
    return _PUNCTUATION.sub(" ", _APOSTROPHES.sub("", text))


def _words_to_digits(tokens: list[str]) -> list[str]:
    out: list[str] = []
    previous = None
    for tok in tokens:
        value = _NUMBER_WORDS.get(tok)
        # "twenty three" (or "twenty-three") reads as one number, not "20 3".
        if previous in _TENS and value is not None and 0 < value < 10:
            out[-1] = str(previous + value)
        else:
            out.append(tok if value is None else str(value))
        previous = value
    return out


def normalize_answer(text: str) -> str:
    """Normalises an answer for lenient string comparison.

    Lower-cases, drops punctuation (not ``.``/``:`` between digits: 3.5, 10:30) and
    a/an/the, maps number words (zero..twenty, the tens) to digits, collapses whitespace.

    Args:
        text: Raw answer text.

    Returns:
        The normalised answer, e.g. ``"Three."`` -> ``"3"``.
    """
    text = _strip_punctuation(text.lower().strip())
    return " ".join(_words_to_digits([t for t in text.split() if t not in _ARTICLES]))


class ExactMatch(AnswerMetric):
    """1 when the normalised prediction equals any normalised reference."""

    def score(self, prediction: str, references: list[str]) -> float:
        pred = normalize_answer(prediction)
        return float(any(pred == normalize_answer(r) for r in references))


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s+\S", re.MULTILINE)


def prompt_letters(prompt: str | None) -> str | None:
    """The option letters a prompt lists as lines like "M. name" (or "(M) name"), in order.

    None when it lists fewer than two (then the question is not a letter choice we can read).
    """
    letters = dict.fromkeys(_OPTION_LINE.findall(prompt or ""))
    return "".join(letters) if len(letters) >= 2 else None


@functools.lru_cache(maxsize=128)
def _choice_patterns(letters: str) -> tuple[list[re.Pattern], re.Pattern, re.Pattern]:
    up, anycase = f"[{letters}]", f"[{letters}{letters.lower()}]"
    # A lower-case letter counts only where it is clearly not a word ("(b)", "b." at the end).
    token = rf"(?:\(({anycase})\)|({up})(?![A-Za-z0-9])|({anycase})(?=[.):,]|\s*$))"
    patterns = [
        re.compile(rf"^\s*{token}\s*[.):]?\s*$"),
        re.compile(rf"(?i:answer)\s*(?i:is|:|=)?\s*(?i:option\s*)?{token}"),
        re.compile(rf"(?i:option|choice)\s*(?i:is|:)\s*{token}"),
        re.compile(rf"^\s*(?:\(({anycase})\)|({anycase})\)|({up})[.:])"),
    ]
    return patterns, re.compile(rf"^\s*({up})\s+(\S)"), re.compile(rf"\(({anycase})\)")


def extract_choice(text: str, letters: str) -> str | None:
    """The upper-case option letter (one of ``letters``) chosen in ``text``, or None."""
    patterns, leading, parenthesised = _choice_patterns(letters)
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            return next(g for g in match.groups() if g).upper()
    match = leading.match(text)
    # "A cat ..." or "I think ..." start with an English word, not an option.
    if match and not (match.group(1) in "AI" and match.group(2).islower()):
        return match.group(1)
    found = {m.upper() for m in parenthesised.findall(text)}
    return found.pop() if len(found) == 1 else None


class MultipleChoice(AnswerMetric):
    """Compares the option letter chosen in the prediction with the reference letter.

    The valid letters are the options listed in each sample's prompt (lines like "M. name",
    A-Z), so a 26-option question answered "M" can score; without listed options, A-Z.
    Predictions without a recognisable letter score 0; part ``unparsed`` is their share.

    Args:
        choices: Fixed valid option letters for every sample (overrides the prompt's options).
    """

    sample_fields = ("prompt",)
    part_names = ("unparsed",)

    def __init__(self, choices: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.choices = choices.upper() if choices else None

    def letters(self, prompt: str | None = None) -> str:
        """The valid option letters for a sample with this prompt."""
        return self.choices or prompt_letters(prompt) or string.ascii_uppercase

    def extract_choice(self, text: str, prompt: str | None = None) -> str | None:
        """Returns the upper-case option letter chosen in ``text``, or None."""
        return extract_choice(text, self.letters(prompt))

    def score_sample(self, prediction: str, references: list[str], prompt: str | None = None) -> dict:
        letters = self.letters(prompt)
        choice = extract_choice(prediction, letters)
        refs = [extract_choice(r, letters) or r.strip().upper() for r in references]
        return {"score": float(choice is not None and choice in refs), "unparsed": float(choice is None)}


_NUMBER_TOKEN = re.compile(r"(?<![\d.:])\d+(?:[.:]\d+)*")


def _first_integer(text: str) -> int | None:
    for token in _NUMBER_TOKEN.findall(normalize_answer(text)):
        # Skip times and real decimals; "3.0" is still the integer 3.
        if re.fullmatch(r"\d+(?:\.0+)?", token):
            return int(float(token))
    return None


class IntegerMatch(AnswerMetric):
    """1 when the first integer (digits or number word) in the prediction equals the reference's.

    Predictions without an integer score 0; part ``unparsed`` is their share.
    """

    part_names = ("unparsed",)

    def score_sample(self, prediction: str, references: list[str]) -> dict[str, float]:
        value = _first_integer(prediction)
        hit = value is not None and any(value == _first_integer(r) for r in references)
        return {"score": float(hit), "unparsed": float(value is None)}


_CLOCK = re.compile(r"(?<![\d.:])(\d{1,2})\s*[:.]\s*(\d{2})(?!\d)")
_HOUR_ONLY = re.compile(r"(?<![\d.:])(\d{1,2})\s*(?:[ap]\.?\s*m\b|o['’]?\s*clock)", re.IGNORECASE)


def _parse_time(text: str) -> tuple[int, int] | None:
    """Returns (hour mod 12, minute) of the first clock time in ``text``, or None."""
    match = _CLOCK.search(text)
    if match and int(match.group(1)) <= 24 and int(match.group(2)) < 60:
        return int(match.group(1)) % 12, int(match.group(2))
    match = _HOUR_ONLY.search(text)
    if match and int(match.group(1)) <= 24:
        return int(match.group(1)) % 12, 0
    return None


def _circular(a: int, b: int, period: int) -> int:
    diff = abs(a - b) % period
    return min(diff, period - diff)


class TimeMatch(AnswerMetric):
    """Clock-reading accuracy on a 12-hour dial (am/pm is ignored).

    Correct when within ``tolerance`` minutes of the reference on the dial, so "10:59" vs
    "11:00" is correct at tolerance 1. Parts: ``hour`` (equal hours mod 12), ``minute``
    (minutes within tolerance, circular over 60), ``both`` (the headline) and ``unparsed``
    (share of predictions without a time; they score 0). For LMM_CL's TimeClock rule see
    ``mllm_cl.benchmark_metrics.TimeClock``.

    Args:
        tolerance: Allowed difference in minutes.
    """

    part_names = ("hour", "minute", "both", "unparsed")

    def __init__(self, tolerance: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tolerance = tolerance

    def _parts(self, prediction: str, references: list[str]) -> tuple[bool, bool, bool]:
        pred = _parse_time(prediction)
        refs = [t for t in map(_parse_time, references) if t is not None]
        if pred is None:
            return False, False, False
        hour = any(pred[0] == r[0] for r in refs)
        minute = any(_circular(pred[1], r[1], 60) <= self.tolerance for r in refs)
        dial = [_circular(pred[0] * 60 + pred[1], r[0] * 60 + r[1], 720) for r in refs]
        return hour, minute, any(d <= self.tolerance for d in dial)

    def score_sample(self, prediction: str, references: list[str]) -> dict[str, float]:
        hour, minute, both = map(float, self._parts(prediction, references))
        unparsed = float(_parse_time(prediction) is None)
        return {"score": both, "hour": hour, "minute": minute, "both": both, "unparsed": unparsed}


class EMTClassification(AnswerMetric):
    """EMT-style classification accuracy (Zhai et al., 2023).

    The prediction is mapped to one label: a label equal to the normalised
    prediction, else the only label contained in it as a whole word/phrase
    (a label inside a longer matched label, "dog" in "hot dog", does not count).
    Zero or several matches score 0; part ``unmatched`` is their share.

    Args:
        labels: Label set used when :meth:`update` gets no per-sample labels.
    """

    sample_fields = ("labels",)
    part_names = ("unmatched",)

    def __init__(self, labels: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels = list(labels) if labels is not None else None

    def match_label(self, prediction: str, labels: Sequence[str] | None = None) -> str | None:
        """Returns the normalised label the prediction names (None if none or several)."""
        labels = self.labels if labels is None else labels
        if labels is None:
            raise ValueError("EMTClassification needs labels at init or per sample in update()")
        pred = normalize_answer(prediction)
        candidates = {n for n in map(normalize_answer, labels) if n}
        if pred in candidates:
            return pred
        spans = {c: _phrase_spans(pred, c) for c in candidates}
        spans = {c: s for c, s in spans.items() if s}
        hits = [c for c, s in spans.items() if not _all_nested(s, c, spans)]
        return hits[0] if len(hits) == 1 else None

    def score_sample(
        self, prediction: str, references: list[str], labels: Sequence[str] | None = None
    ) -> dict[str, float]:
        matched = self.match_label(prediction, labels)
        hit = matched is not None and matched in map(normalize_answer, references)
        return {"score": float(hit), "unmatched": float(matched is None)}

    def update(
        self, preds: Sequence[str], targets: Targets, labels: Sequence[Sequence[str]] | None = None
    ) -> None:
        """Adds a batch; ``labels`` optionally gives each sample its own label set."""
        # An explicit ``labels`` parameter: callers detect per-sample label support by signature.
        super().update(preds, targets, labels=labels)

    def compute_parts(self) -> dict[str, torch.Tensor]:
        """Accuracy and the share of unmatched answers (EMT's hallucinations), synced across processes."""
        with self.sync_context():
            total = self.total.clamp(min=1)
            return {"accuracy": self.correct / total, "unmatched": self.unmatched / total}


def _phrase_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    # Normalised text is space-separated, so whole words are bounded by spaces or the ends.
    return [m.span() for m in re.finditer(rf"(?<!\S){re.escape(phrase)}(?!\S)", text)]


def _all_nested(own: list[tuple[int, int]], label: str, spans: dict[str, list[tuple[int, int]]]) -> bool:
    """Whether every occurrence of ``label`` lies inside an occurrence of a longer label."""
    longer = [s for other, ss in spans.items() if len(other) > len(label) for s in ss]
    return all(any(a <= start and end <= b for a, b in longer) for start, end in own)


_METRICS: dict[str, type[AnswerMetric]] = {
    "exact_match": ExactMatch,
    "vqa": VQAAccuracy,
    "multiple_choice": MultipleChoice,
    "integer": IntegerMatch,
    "time": TimeMatch,
    "emt": EMTClassification,
    # The papers' benchmark rules: held-out sets (lmms-eval) and LMM_CL's target tasks.
    **BENCHMARK_METRICS,
    **LMMCL_METRICS,
    "classname_mischoice": ClassnameMisChoice,  # Li et al.'s diagnostic (mllm_cl/diagnostics.py)
}


def build_metric(name: str, **kwargs) -> AnswerMetric:
    """Builds the metric registered as ``name`` with ``kwargs``; unknown names raise ValueError.

    The one registry of metric names: the generic metrics above plus the benchmark ones.
    """
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(_METRICS)}")
    return _METRICS[name](**kwargs)
