"""Answer metrics: torchmetrics that score generated free-text answers against reference answers."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
import torchmetrics

from mllm_cl.diagnostics import ClassnameMisChoice

_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"
_TENS_WORDS = "thirty forty fifty sixty seventy eighty ninety"
_NUMBER_WORDS = dict(zip(_UNITS.split(), range(21), strict=True))
_NUMBER_WORDS.update(zip(_TENS_WORDS.split(), range(30, 100, 10), strict=True))
_TENS = set(range(20, 100, 10))
Targets = Sequence[str | Sequence[str]]  # per sample: one reference or a list of references
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


def _reference_lists(preds: Sequence[str], targets: Targets) -> list[list[str]]:
    # A bare string would otherwise be iterated character by character.
    if isinstance(preds, str):
        raise TypeError("preds must be a list of strings, not a single string")
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets")
    return [[t] if isinstance(t, str) else list(t) for t in targets]


class AnswerMetric(torchmetrics.Metric):
    """Mean per-sample score of free-text answers; subclasses implement :meth:`score`.

    States ``correct`` (summed scores) and ``total`` (samples) are summed across processes.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _add_counter(self, name: str) -> None:
        self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")

    def score(self, prediction: str, references: list[str]) -> float:
        """Scores one generated answer against its acceptable references, in [0, 1]."""
        raise NotImplementedError

    def update(self, preds: Sequence[str], targets: Targets) -> None:
        """Adds a batch: one answer per sample, and per sample a reference or a list of them."""
        refs = _reference_lists(preds, targets)
        self._accumulate([self.score(p, r) for p, r in zip(preds, refs, strict=True)])
        self._count_extra(preds, refs)

    def _accumulate(self, scores: list[float]) -> None:
        self.correct += float(sum(scores))
        self.total += len(scores)

    def _count_extra(self, preds: Sequence[str], refs: list[list[str]]) -> None:
        """Hook for subclasses that track additional counters."""

    def compute(self) -> torch.Tensor:
        """Returns the mean score, or 0.0 when nothing was added."""
        if self.total == 0:
            return torch.zeros((), device=self.correct.device)
        return self.correct / self.total


class ExactMatch(AnswerMetric):
    """1 when the normalised prediction equals any normalised reference."""

    def score(self, prediction: str, references: list[str]) -> float:
        pred = normalize_answer(prediction)
        return float(any(pred == normalize_answer(r) for r in references))


class VQAAccuracy(AnswerMetric):
    """VQAv2 soft accuracy ``min(1, #humans agreeing / 3)``.

    With 10+ references it averages over leave-one-out subsets like the official VQA eval.
    """

    def score(self, prediction: str, references: list[str]) -> float:
        pred = normalize_answer(prediction)
        hits = [normalize_answer(r) == pred for r in references]
        if len(hits) < 10:
            return min(1.0, sum(hits) / 3)
        matches = sum(hits)
        # Dropping annotator i leaves matches - hits[i] agreeing humans.
        return sum(min(1.0, (matches - h) / 3) for h in hits) / len(hits)


class MultipleChoice(AnswerMetric):
    """Compares the option letter chosen in the prediction with the reference letter.

    Predictions without a recognisable letter score 0 and are counted in ``unparsed``.

    Args:
        choices: Valid option letters; other letters are never extracted.
    """

    def __init__(self, choices: str = "ABCDEFGH", **kwargs) -> None:
        super().__init__(**kwargs)
        self.choices = choices.upper()
        self._add_counter("unparsed")
        up, anycase = f"[{self.choices}]", f"[{self.choices}{self.choices.lower()}]"
        # A lower-case letter counts only where it is clearly not a word ("(b)", "b." at the end).
        token = rf"(?:\(({anycase})\)|({up})(?![A-Za-z0-9])|({anycase})(?=[.):,]|\s*$))"
        self._patterns = [
            re.compile(rf"^\s*{token}\s*[.):]?\s*$"),
            re.compile(rf"(?i:answer)\s*(?i:is|:|=)?\s*(?i:option\s*)?{token}"),
            re.compile(rf"(?i:option|choice)\s*(?i:is|:)\s*{token}"),
            re.compile(rf"^\s*(?:\(({anycase})\)|({anycase})\)|({up})[.:])"),
        ]
        self._leading = re.compile(rf"^\s*({up})\s+(\S)")
        self._parenthesised = re.compile(rf"\(({anycase})\)")

    def extract_choice(self, text: str) -> str | None:
        """Returns the upper-case option letter chosen in ``text``, or None."""
        for pattern in self._patterns:
            match = pattern.search(text)
            if match:
                return next(g for g in match.groups() if g).upper()
        match = self._leading.match(text)
        # "A cat ..." or "I think ..." start with an English word, not an option.
        if match and not (match.group(1) in "AI" and match.group(2).islower()):
            return match.group(1)
        found = {m.upper() for m in self._parenthesised.findall(text)}
        return found.pop() if len(found) == 1 else None

    def score(self, prediction: str, references: list[str]) -> float:
        choice = self.extract_choice(prediction)
        return float(
            choice is not None
            and any(choice == (self.extract_choice(r) or r.strip().upper()) for r in references)
        )

    def _count_extra(self, preds: Sequence[str], refs: list[list[str]]) -> None:
        self.unparsed += sum(self.extract_choice(p) is None for p in preds)


_NUMBER_TOKEN = re.compile(r"(?<![\d.:])\d+(?:[.:]\d+)*")


def _first_integer(text: str) -> int | None:
    for token in _NUMBER_TOKEN.findall(normalize_answer(text)):
        # Skip times and real decimals; "3.0" is still the integer 3.
        if re.fullmatch(r"\d+(?:\.0+)?", token):
            return int(float(token))
    return None


class IntegerMatch(AnswerMetric):
    """1 when the first integer (digits or number word) in the prediction equals the reference's.

    Predictions without an integer score 0 and are counted in ``unparsed``.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._add_counter("unparsed")

    def score(self, prediction: str, references: list[str]) -> float:
        value = _first_integer(prediction)
        return float(value is not None and any(value == _first_integer(r) for r in references))

    def _count_extra(self, preds: Sequence[str], refs: list[list[str]]) -> None:
        self.unparsed += sum(_first_integer(p) is None for p in preds)


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
    "11:00" is correct at tolerance 1. :meth:`compute_parts` also reports ``hour_correct``
    (equal hours mod 12) and ``minute_correct`` (minutes within tolerance, circular over
    60). Unparsable predictions score 0 and are counted in ``unparsed``.

    Args:
        tolerance: Allowed difference in minutes.
    """

    def __init__(self, tolerance: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tolerance = tolerance
        for name in ("hour_correct", "minute_correct", "unparsed"):
            self._add_counter(name)

    def _parts(self, prediction: str, references: list[str]) -> tuple[bool, bool, bool]:
        pred = _parse_time(prediction)
        refs = [t for t in map(_parse_time, references) if t is not None]
        if pred is None:
            return False, False, False
        hour = any(pred[0] == r[0] for r in refs)
        minute = any(_circular(pred[1], r[1], 60) <= self.tolerance for r in refs)
        dial = [_circular(pred[0] * 60 + pred[1], r[0] * 60 + r[1], 720) for r in refs]
        return hour, minute, any(d <= self.tolerance for d in dial)

    def score(self, prediction: str, references: list[str]) -> float:
        return float(self._parts(prediction, references)[2])

    def _count_extra(self, preds: Sequence[str], refs: list[list[str]]) -> None:
        parts = [self._parts(p, r) for p, r in zip(preds, refs, strict=True)]
        self.hour_correct += sum(p[0] for p in parts)
        self.minute_correct += sum(p[1] for p in parts)
        self.unparsed += sum(_parse_time(p) is None for p in preds)

    def compute_parts(self) -> dict[str, torch.Tensor]:
        """Returns hour, minute and combined ("both") accuracy, synced across processes."""
        with self.sync_context():
            total = self.total.clamp(min=1)  # all counters are 0 when total is 0
            parts = {"hour": self.hour_correct, "minute": self.minute_correct, "both": self.correct}
            return {name: count / total for name, count in parts.items()}


class EMTClassification(AnswerMetric):
    """EMT-style classification accuracy (Zhai et al., 2023).

    The prediction is mapped to one label: a label equal to the normalised
    prediction, else the only label contained in it as a whole word/phrase
    (a label inside a longer matched label, "dog" in "hot dog", does not count).
    Zero or several matches score 0 and are counted in ``unmatched``.

    Args:
        labels: Label set used when :meth:`update` gets no per-sample labels.
    """

    def __init__(self, labels: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels = list(labels) if labels is not None else None
        self._add_counter("unmatched")

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

    def score(self, prediction: str, references: list[str], labels: Sequence[str] | None = None) -> float:
        matched = self.match_label(prediction, labels)
        return float(matched is not None and matched in map(normalize_answer, references))

    def update(
        self, preds: Sequence[str], targets: Targets, labels: Sequence[Sequence[str]] | None = None
    ) -> None:
        """Adds a batch; ``labels`` optionally gives each sample its own label set."""
        per_sample = labels if labels is not None else [None] * len(preds)
        samples = list(zip(preds, _reference_lists(preds, targets), per_sample, strict=True))
        self._accumulate([self.score(p, r, ls) for p, r, ls in samples])
        self.unmatched += sum(self.match_label(p, ls) is None for p, _, ls in samples)

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
    "classname_mischoice": ClassnameMisChoice,  # Li et al.'s diagnostic (mllm_cl/diagnostics.py)
}


def build_metric(name: str, **kwargs) -> AnswerMetric:
    """Builds the metric registered as ``name`` with ``kwargs``; unknown names raise ValueError."""
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(_METRICS)}")
    return _METRICS[name](**kwargs)
