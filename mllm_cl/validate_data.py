"""Checks of every train / eval set before the model loads (``data.validate``).

A bad sample otherwise surfaces hours into a 7B run (after the model loaded and the base row was
evaluated) or never (a word the tokenizer cannot represent silently becomes ``<unk>``). Run from
`TaskStream.prepare_tables`, i.e. in Lightning's ``setup``, before ``configure_model`` builds the
model; the processor (and so the tokenizer) is loaded with the module's config already.

- **images**: every image of every sample is opened. ``fast`` (the default) reads each file's
  header and runs PIL's ``verify`` (which for PNG also walks every chunk and its checksum) without
  decoding pixels; ``full`` decodes every image (also finds a JPEG cut short); ``off`` skips all
  checks. Files are opened from a thread pool; an Arrow image column is read as bytes, undecoded.
- **<image> placeholders**: their count must match the sample's images (no placeholder with images
  is fine: one is put in front of the first question). The error names the file and the record.
- **unknown tokens**: questions and answers are tokenised with the model's tokenizer; when some
  map to its unknown token a warning gives the counts and examples, and when more than
  ``data.max_unk_answers`` of a set's answers do the run stops: the model could never produce them.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from mllm_cl.data.tables import ImageRef, tokens_view
from mllm_cl.errors import DataError

MODES = ("fast", "full", "off")
_BATCH = 256


@dataclass
class Record:
    """What the checks need of one sample, with its images still undecoded."""

    where: str
    id: str
    messages: list[dict]
    answers: list[str]
    images: list[tuple[str, Callable]] = field(default_factory=list)  # (name, opener -> path or file)


def check_mode(mode: str, max_unk_answers: float = 0.0) -> None:
    if mode not in MODES:
        raise DataError(f"data.validate={mode!r}; use one of {list(MODES)}")
    if not 0 <= max_unk_answers <= 1:
        raise DataError(f"data.max_unk_answers={max_unk_answers}; use a fraction in [0, 1]")


# ---- reading samples without decoding images ---------------------------------------------------
def records(table, limit: int | None = None) -> Iterator[Record]:
    """The samples of a loaded table as `Record`s (the first `limit` of them), through the table's
    `tokens_view`: images stay file paths or encoded bytes (`ImageRef`) wherever the table can."""
    n = len(table) if limit is None else min(limit, len(table))
    for i in range(n):
        sample = tokens_view(table, i)
        images = sample.get("images") or []
        refs = [img for img in images if isinstance(img, ImageRef)]
        where = refs[0].where if refs and refs[0].where else f"sample {i}"
        named = [(_name(img, k), _opener(img)) for k, img in enumerate(images)]
        yield Record(where, str(sample.get("id", i)), sample["messages"], list(sample["answers"]), named)


def _name(img, k: int) -> str:
    return img.path if isinstance(img, ImageRef) and img.path else f"image {k}"


def _opener(img) -> Callable:
    if isinstance(img, ImageRef):
        return (lambda: img.path) if img.data is None else (lambda: io.BytesIO(img.data))
    return lambda: img  # decoded already by its table


# ---- the checks -------------------------------------------------------------------------------
def check_placeholders(rec: Record) -> None:
    marks = sum(m["content"].count("<image>") for m in rec.messages)
    if marks and marks != len(rec.images):
        raise DataError(
            f"{rec.where} (id {rec.id!r}): {marks} <image> placeholders but {len(rec.images)} images; "
            "give one <image> per image"
        )


def _open(name: str, opener: Callable, full: bool) -> str | None:
    """None when the image is readable, else the reason."""
    try:
        source = opener()
        if isinstance(source, Image.Image):
            return None  # decoded already by its table
        with Image.open(source) as img:
            if full:
                img.load()
            else:
                img.verify()
    except Exception as err:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, struct.error...)
        return f"{type(err).__name__}: {err}"
    return None


def check_images(recs: Sequence[Record], full: bool) -> int:
    """Open every image (a thread pool); the first unreadable one, in table order, is the error."""
    jobs = [(rec, name, opener) for rec in recs for name, opener in rec.images]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        problems = list(pool.map(lambda job: _open(job[1], job[2], full), jobs))
    for (rec, name, _), problem in zip(jobs, problems, strict=True):
        if problem:
            raise DataError(
                f"{rec.where} (id {rec.id!r}): image {name} cannot be read ({problem}); "
                "replace the file or drop the sample"
            )
    return len(jobs)


def unknown_tokens(tokenizer, texts: list[str]) -> tuple[list[bool], list[str]]:
    """Per text: does it contain the unknown token; and examples of the text pieces that became it."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return [False] * len(texts), []
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
    flags, examples = [], []
    for k, ids in enumerate(enc["input_ids"]):
        hits = [j for j, t in enumerate(ids) if t == unk]
        flags.append(bool(hits))
        for j in hits if fast else []:
            start, end = enc["offset_mapping"][k][j]
            piece = texts[k][start:end]
            if piece and piece not in examples and len(examples) < 5:
                examples.append(piece)
    return flags, examples


def check_unknown(name: str, recs: Sequence[Record], tokenizer, max_unk_answers: float) -> int:
    """Warn about questions / answers holding unknown tokens; stop above `max_unk_answers`."""
    questions = [
        " ".join(m["content"].replace("<image>", " ") for m in r.messages if m["role"] == "user")
        for r in recs
    ]
    answers = [" ".join(r.answers) for r in recs]
    q_flags, q_examples = unknown_tokens(tokenizer, questions)
    a_flags, a_examples = unknown_tokens(tokenizer, answers)
    n_q, n_a = sum(q_flags), sum(a_flags)
    if not n_q and not n_a:
        return 0
    unk = getattr(tokenizer, "unk_token", "<unk>")
    examples = ", ".join(repr(e) for e in (a_examples + [e for e in q_examples if e not in a_examples])[:5])
    line = (f"{name}: {n_q} of {len(recs)} questions and {n_a} of {len(recs)} answers contain text the "
            f"tokenizer maps to {unk} (e.g. {examples or '?'})")  # fmt: skip
    if n_a > max_unk_answers * len(recs):
        first = next(r for r, flag in zip(recs, a_flags, strict=True) if flag)
        raise DataError(
            f"{line}, first {first.where} (id {first.id!r}); the model can never produce these answers: fix "
            f"the data or the tokenizer, or raise data.max_unk_answers (now {max_unk_answers})"
        )
    _warn(f"warning: {line}")
    return n_q + n_a


def _warn(text: str) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(f"[mllm_cl] {text}", file=sys.stderr, flush=True)


def check_sets(sets: list[tuple[str, object]], tokenizer, mode: str, max_unk_answers: float) -> None:
    """Run every check on every (name, table) before any model work; one summary line."""
    check_mode(mode)
    if mode == "off":
        return
    start, samples, images, unknown = time.perf_counter(), 0, 0, 0
    for name, table in sets:
        recs = list(records(table))
        for rec in recs:
            check_placeholders(rec)
        images += check_images(recs, full=mode == "full")
        unknown += check_unknown(name, recs, tokenizer, max_unk_answers)
        samples += len(recs)
    _warn(
        f"data.validate={mode}: {len(sets)} sets, {samples} samples, {images} images opened, <image> counts "
        f"match, {unknown or 'no'} texts with unknown tokens ({time.perf_counter() - start:.1f} s)"
    )


def check_stream(stream, processor, stage: str) -> None:
    """`check_sets` on a `TaskStream`'s eval sets and, for `fit`, its tasks' training sets."""
    train = [
        (f"data.tasks[{i}].train ({t.name})", table)
        for i, (t, table) in enumerate(zip(stream.tasks, stream._train, strict=True))
    ]
    sets = (train if stage == "fit" else []) + [(f"eval set {c.name}", c.table) for c in stream.columns]
    tokenizer = getattr(processor, "tokenizer", processor)
    check_sets(sets, tokenizer, stream.validate, stream.max_unk_answers)
