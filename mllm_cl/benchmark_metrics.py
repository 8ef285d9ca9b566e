"""The held-out benchmarks' metrics as lmms-eval v0.3.0 (LMM_CL's vendored copy) computes them.

Facts from /work/shared/BENCHMARKS.md §0 and §2; the code is ours. Every rule is applied to the
stripped generated answer (LMM_CL's model wrapper and lmms-eval both strip it). Where the upstream
rule is a bug we implement the intended rule and the class docstring says so.
"""

from __future__ import annotations

import math
import re
import string

import torch

from mllm_cl.answer_metric import AnswerMetric, _mean

# ---- VQA soft accuracy with EvalAI answer normalisation (TextVQA) -------------------------------

# Contracted forms; EvalAI maps each spelling with exactly one apostrophe dropped back to it.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've
hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
_CONTRACTIONS = {w[:i] + w[i + 1 :]: w for w in _CONTRACTED for i, c in enumerate(w) if c == "'"}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: EvalAI's table maps this one the other way round
# (EvalAI's capitalised keys "Im", "Ive", "Id've" can never match lower-cased text: left out.)
_EVALAI_NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                           ["0", *map(str, range(11))], strict=True))  # fmt: skip
# EvalAI also lists "," and "?" (already deleted above) and drops every mark when the text has a
# comma between digits, which cannot happen once commas are gone.
_EVALAI_PUNCT = ';/[]"{}()=+\\_-><@`!'
# EvalAI's pattern "(?!<=\d)(\.)(?!\d)" meant a look-behind but is a look-ahead that always holds,
# so a period goes unless a digit follows ("3." -> "3", "1.5" stays); kept as executed.
_PERIOD = re.compile(r"\.(?!\d)")


def evalai_normalize(answer: str) -> str:
    """The EvalAI / VQA answer normalisation lmms-eval applies to predictions and references."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # A mark that touches a space anywhere in the text is deleted everywhere, else it splits words.
    out = text
    for mark in _EVALAI_PUNCT:
        out = out.replace(mark, "" if f"{mark} " in text or f" {mark}" in text else " ")
    out = _PERIOD.sub("", out, count=32)  # sic: EvalAI passes re.UNICODE (32) as the count
    words = [_EVALAI_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


class VQAAccuracy(AnswerMetric):
    """VQA soft accuracy (VQAv2 / TextVQA as lmms-eval scores ``textvqa_val``).

    Prediction and references are EvalAI-normalised; with 10 or more references the score is
    the mean over the leave-one-out subsets of ``min(1, #references equal to the prediction / 3)``.
    With 3-9 references (never in the papers' sets) it is ``min(1, matches / 3)`` over all.
    A sample with fewer than 3 references is refused: one reference caps the score at 1/3.

    Args:
        allow_few_references: Score samples with 1-2 references anyway (capped at 1/3 or 2/3).
    """

    def __init__(self, allow_few_references: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.allow_few_references = allow_few_references

    def validate_references(self, references: list[list[str]]) -> None:
        few = [i for i, refs in enumerate(references) if len(refs) < 3]
        if few and not self.allow_few_references:
            raise ValueError(
                f"vqa: {len(few)} of {len(references)} samples have fewer than 3 reference answers "
                f"(first: sample {few[0]} with {references[few[0]]}), which caps VQA accuracy at 1/3; "
                "keep all human answers (Benchmark 'textvqa' does) or set metric_args: {allow_few_references: true}"
            )

    def score(self, prediction: str, references: list[str]) -> float:
        pred = evalai_normalize(prediction)
        hits = [evalai_normalize(r) == pred for r in references]
        if len(hits) < 10:
            return min(1.0, sum(hits) / 3)
        matches = sum(hits)
        # Dropping annotator i leaves matches - hits[i] agreeing humans.
        return sum(min(1.0, (matches - h) / 3) for h in hits) / len(hits)


# ---- ANLS (DocVQA, InfoVQA) ---------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


class ANLS(AnswerMetric):
    """Average Normalised Levenshtein Similarity, as lmms-eval's ``anls`` (DocVQA, InfoVQA).

    Per sample ``1 - min_ref lev(norm(ref), norm(pred)) / max(len(ref), len(pred))`` where
    ``norm`` lower-cases and collapses whitespace but the lengths are the un-normalised strings'
    (as upstream); a score below ``threshold`` becomes 0.

    Args:
        threshold: Similarities below it score 0 (tau = 0.5 in the papers).
    """

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def score(self, prediction: str, references: list[str]) -> float:
        pred = prediction.strip()
        norm_pred = " ".join(pred.lower().split())
        distances = []
        for ref in references:
            length = max(len(ref.upper()), len(pred.upper()))
            dist = levenshtein(" ".join(ref.strip().lower().split()), norm_pred)
            distances.append(0.0 if length == 0 else dist / length)
        value = 1.0 - min(distances, default=1.0)
        return 0.0 if value < self.threshold else value


# ---- ChartQA relaxed accuracy -------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA: numbers ("x%" = x/100) within ``tolerance`` relative error, else equal ignoring case."""
    pred, gold = _to_float(prediction), _to_float(target)
    if pred is not None and gold:  # a 0 (or unparsable) target needs string equality
        return abs(pred - gold) / abs(gold) <= tolerance
    return prediction.lower() == target.lower()


class RelaxedAccuracy(AnswerMetric):
    """ChartQA relaxed accuracy (``relaxed_overall``); parts ``human`` and ``augmented``.

    The parts are the means over the samples whose field ``type`` is ``human_test`` and over the
    others (upstream's ``relaxed_human_split`` / ``relaxed_augmented_split``).

    Args:
        tolerance: Largest relative error of a numeric answer that still counts.
    """

    sample_fields = ("type",)
    part_names = ("human", "augmented")

    def __init__(self, tolerance: float = 0.05, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tolerance = tolerance

    def score_sample(self, prediction: str, references: list[str], type: str | None = None) -> dict:  # noqa: A002
        value = float(any(relaxed_correct(prediction.strip(), r, self.tolerance) for r in references))
        out = {"score": value}
        if type is not None:
            out["human" if type == "human_test" else "augmented"] = value
        return out


# ---- OCRBench -----------------------------------------------------------------------------------


def ocrbench_hit(prediction: str, answer: str, dataset: str | None) -> bool:
    """OCRBench containment: HME100k compares without spaces/newlines, case kept; else lower-cased."""
    if dataset == "HME100k":
        squash = str.maketrans("", "", " \n")
        return answer.strip().translate(squash) in prediction.strip().translate(squash)
    return answer.lower().strip().replace("\n", " ") in prediction.lower().strip().replace("\n", " ")


class OCRBench(AnswerMetric):
    """OCRBench: 1 when any reference is contained in the prediction; reported as sum / N.

    Upstream divides by 1000, the full set's size; sum / N equals it there and stays a mean on a
    subset. Deliberate difference from v0.3.0: for ``dataset == "HME100k"`` (LaTeX formulas)
    v0.3.0 lower-cases the prediction but not the reference, so a formula with a capital letter
    can never match; we compare case-sensitively on both sides, as OCRBench's own code and
    lmms-eval HEAD do. (HEAD's full-width -> ASCII folding is not in v0.3.0 and not done.)
    """

    sample_fields = ("dataset",)

    def score(self, prediction: str, references: list[str], dataset: str | None = None) -> float:
        return float(any(ocrbench_hit(prediction, r, dataset) for r in references))


# ---- MMStar -------------------------------------------------------------------------------------

MMSTAR_CATEGORIES = {
    "coarse perception": ["image scene and topic", "image style & quality", "image emotion"],
    "fine-grained perception": ["object counting", "recognition", "localization"],
    "instance reasoning": [
        "single-instance reasoning", "cross-instance attribute reasoning", "cross-instance relation reasoning"
    ],
    "logical reasoning": ["code & sequence reasoning", "diagram reasoning", "common reasoning"],
    "science & technology": [
        "biology & chemistry & physics", "electronics & energy & mechanical eng.",
        "geography & earth science & agriculture",
    ],
    "math": ["geometry", "numeric commonsense and calculation", "statistical reasoning"],
}  # fmt: skip
_MMSTAR_L2 = [l2 for l2s in MMSTAR_CATEGORIES.values() for l2 in l2s]


def mmstar_match(prediction: str, answer: str) -> bool:
    """MMStar's letter rule: the first character, or the one after "(", "option ", "the answer is "."""
    gold = answer.lower().strip().replace("\n", " ")
    pred = prediction.lower().strip().replace("\n", " ")
    return any(
        pred.startswith(prefix) and len(pred) > len(prefix) and gold == pred[len(prefix)]
        for prefix in ("", "(", "option ", "the answer is ")
    )


class MMStar(AnswerMetric):
    """MMStar: the macro mean over ``l2_category`` of per-category accuracy (``average``).

    Parts: the 6 categories, each the mean over its l2 categories present in the data (upstream
    aggregates each category metric the same way). Needs the per-sample field ``l2_category``.
    """

    sample_fields = ("l2_category",)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("l2_sum", default=torch.zeros(len(_MMSTAR_L2)), dist_reduce_fx="sum")
        self.add_state("l2_n", default=torch.zeros(len(_MMSTAR_L2)), dist_reduce_fx="sum")

    def score(self, prediction: str, references: list[str], l2_category: str | None = None) -> float:
        return float(any(mmstar_match(prediction, r) for r in references))

    def _accumulate(self, samples: list[dict], fields: list[dict]) -> None:
        super()._accumulate(samples, fields)
        sums, counts = torch.zeros_like(self.l2_sum), torch.zeros_like(self.l2_n)
        for sample, field in zip(samples, fields, strict=True):
            l2 = field["l2_category"]
            if l2 not in _MMSTAR_L2:
                raise ValueError(
                    f"mmstar: l2_category {l2!r} is not one of MMStar's 18 (e.g. {_MMSTAR_L2[0]!r}); "
                    "pass each sample's l2_category field (Benchmark 'mmstar' does)"
                )
            sums[_MMSTAR_L2.index(l2)] += sample["score"]
            counts[_MMSTAR_L2.index(l2)] += 1
        self.l2_sum, self.l2_n = self.l2_sum + sums, self.l2_n + counts

    def _macro(self, l2s: list[str]) -> torch.Tensor:
        idx = torch.tensor([_MMSTAR_L2.index(x) for x in l2s], device=self.l2_n.device)
        sums, counts = self.l2_sum[idx], self.l2_n[idx]
        seen = counts > 0
        return _mean((sums[seen] / counts[seen]).sum(), seen.sum())

    def compute(self) -> torch.Tensor:
        value = self._macro(_MMSTAR_L2)
        return torch.zeros_like(value) if math.isnan(value) else value

    def compute_parts(self) -> dict[str, torch.Tensor]:
        with self.sync_context():
            return {cat: self._macro(l2s) for cat, l2s in MMSTAR_CATEGORIES.items()}


# ---- Letter rules: SEED-Bench, AI2D, ScienceQA, RealWorldQA ---------------------------------------

_ASCII_PUNCT = str.maketrans("", "", string.punctuation)


def _exact(a: str, b: str) -> bool:
    """lmms-eval's exact_match with ignore_case and ignore_punctuation (no other normalisation)."""
    return a.lower().translate(_ASCII_PUNCT) == b.lower().translate(_ASCII_PUNCT)


class SeedLetter(AnswerMetric):
    """SEED-Bench (``seed_image``): the first character of the answer equals the letter, any case."""

    def score(self, prediction: str, references: list[str]) -> float:
        pred = prediction.strip()[:1].lower()
        return float(any(pred == r.lower().strip() for r in references))


_AI2D_LETTER = re.compile(r"^\s*([A-Z])\.")


class AI2DLetter(AnswerMetric):
    """AI2D: filter ``flexible-extract`` (the letter of a leading "X." else the whole answer),
    then exact match ignoring case and punctuation."""

    def score(self, prediction: str, references: list[str]) -> float:
        pred = prediction.strip()
        match = _AI2D_LETTER.match(pred)
        pred = match.group(1) if match else pred
        return float(any(_exact(pred, r) for r in references))


class ScienceQALetter(AnswerMetric):
    """ScienceQA-IMG: the answer equals the letter (any case), or starts with "X." for letter X.

    Deliberate difference (intended rule): v0.3.0 lower-cases the answer before testing for an
    upper-case "X." prefix, so that branch never fires and "B. moss" scores 0 against "B";
    we accept it, as lmms-eval HEAD does.
    """

    def score(self, prediction: str, references: list[str]) -> float:
        pred = prediction.strip()
        letter = pred[0] if len(pred) >= 2 and pred[0].isupper() and pred[1] == "." else None
        for ref in references:
            target = ref.strip().lower()
            if pred.lower() == target or (letter is not None and letter.lower() == target):
                return 1.0
        return 0.0


_RWQA_NUMBERS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
_RWQA_CHOICE = re.compile(r"\b([A-Z])\.\s+([^\n]*)")


def realworldqa_filter(response: str, question: str) -> str:
    """v0.3.0's two filters: a number word alone -> digits; an option's text found -> its letter."""
    response = _RWQA_NUMBERS.get(response.lower(), response)
    cleaned = re.sub(r"[^\w\s]", "", response).strip()
    texts = [text.strip() for _, text in _RWQA_CHOICE.findall(question)]
    # Options are lettered A, B, C... in order; a repeated text keeps its last letter (as upstream).
    letters = {text: chr(ord("A") + i) for i, text in enumerate(texts)}
    # Leftmost match, first listed option at the same place: the upstream regex alternation.
    match = re.search("|".join(map(re.escape, texts)), cleaned)
    return letters[match.group()] if match and match.group() in letters else cleaned


class RealWorldQA(AnswerMetric):
    """RealWorldQA as in v0.3.0 / LMM_CL: filters (number words -> digits, option text -> letter,
    options read from the question in the prompt), then exact match ignoring case and
    punctuation. lmms-eval HEAD instead extracts letters with ``extract_mcq_answer``; not used."""

    sample_fields = ("prompt",)

    def score(self, prediction: str, references: list[str], prompt: str | None = None) -> float:
        pred = realworldqa_filter(prediction.strip(), prompt or "")
        return float(any(_exact(pred, r) for r in references))


BENCHMARK_METRICS: dict[str, type[AnswerMetric]] = {
    "anls": ANLS,
    "relaxed_accuracy": RelaxedAccuracy,
    "ocrbench": OCRBench,
    "mmstar": MMStar,
    "seed_letter": SeedLetter,
    "ai2d_letter": AI2DLetter,
    "scienceqa_letter": ScienceQALetter,
    "realworldqa": RealWorldQA,
}
