"""Data sources: where a task's samples come from.

Every source yields samples in one internal form::

    {"id": str, "images": [PIL.Image], "messages": [{"role": "user"|"assistant", "content": str}],
     "answers": [str]}   # references for evaluation; default: the last assistant turn

Sources: LLaVA conversation JSON/JSONL + image folder (the format of LLaVA, LMM_CL and CoIN),
Hugging Face `datasets` (saved to disk or local files), and the offline synthetic generator.
Subclass `Source` and implement `load` to add one.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence

from PIL import Image

from mllm_cl.data.cache import digest
from mllm_cl.errors import DataError

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class Source:
    """Base class of a data source; `load` returns an indexable sequence of samples."""

    def load(self) -> Sequence[dict]:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    @property
    def eval_defaults(self) -> dict:
        """Scoring defaults of a benchmark preset (metric, metric_args, max_new_tokens); {} for plain data."""
        return {}


def conversation_to_messages(turns: list, where: str) -> list[dict]:
    """LLaVA `conversations` ([{"from": "human", "value": ...}, ...]) -> chat messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    messages = []
    for turn in turns:
        role = (
            _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            if isinstance(turn, dict)
            else None
        )
        if role is None:
            raise DataError(f"{where}: each turn needs 'from' (human/gpt) and 'value'; got {str(turn)[:80]}")
        messages.append({"role": role, "content": str(turn.get("value", turn.get("content", "")))})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: conversation has no answer (no non-empty 'gpt' turn); add one or drop it")
    return messages


def _open_image(path: str, where: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"{where}: image {path} cannot be read ({err}); replace the file or drop the sample"
        ) from err


class _LlavaTable(Sequence):
    def __init__(self, records: list[tuple[str, dict]], image_folder: str):
        self.records, self.image_folder = records, image_folder

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        where, rec = self.records[i]
        files = rec.get("image") or []
        files = [files] if isinstance(files, str) else files
        images = [_open_image(os.path.join(self.image_folder, f), where) for f in files]
        messages = conversation_to_messages(rec.get("conversations"), where)
        answers = rec.get("answers") or [
            next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        ]
        return {"id": str(rec.get("id", i)), "images": images, "messages": messages, "answers": list(answers)}


class LlavaJson(Source):
    """LLaVA conversation data: a JSON list or JSONL file plus an image folder.

    Each record: ``{"id": ..., "image": "rel/path.jpg" (or a list, or absent for text-only),
    "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}``.
    An optional ``"answers"`` list gives several references for evaluation (VQA).

    Args:
        path: the .json or .jsonl file.
        image_folder: folder that image paths are relative to (default: the file's folder).
        limit: keep only the first `limit` records.
    """

    def __init__(self, path: str, image_folder: str | None = None, limit: int | None = None):
        self.path, self.limit = path, limit
        self.image_folder = image_folder if image_folder is not None else os.path.dirname(path)

    def describe(self):
        return self.path

    def _records(self) -> list[tuple[str, dict]]:
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: file not found; fix the path in your config")
        with open(self.path, encoding="utf-8") as fh:
            text = fh.read()
        if self.path.endswith(".jsonl"):
            out = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        out.append((f"{self.path}:{lineno}", json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise DataError(
                            f"{self.path}:{lineno}: malformed JSON ({err.msg}); fix or delete the line"
                        ) from err
            return out
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{self.path}:{err.lineno}: malformed JSON ({err.msg}); fix the file") from err
        if not isinstance(data, list):
            raise DataError(f"{self.path}: expected a JSON list of records (or a .jsonl file)")
        return [(f"{self.path} record {i}", rec) for i, rec in enumerate(data)]

    def load(self):
        records = self._records()[: self.limit]
        for where, rec in records:
            if not isinstance(rec, dict):
                raise DataError(f"{where}: a record must be a JSON object")
            conversation_to_messages(rec.get("conversations"), where)  # fail at start, not mid-run
            files = rec.get("image") or []
            for f in [files] if isinstance(files, str) else files:
                full = os.path.join(self.image_folder, f)
                if not os.path.isfile(full):
                    raise DataError(
                        f"{where}: image {full} not found; fix image_folder or the record's 'image'"
                    )
        table = _LlavaTable(records, self.image_folder)
        stat = os.stat(self.path)  # key of data.cache_processed: the file's identity and version
        table.fingerprint = digest(
            "llava", os.path.abspath(self.path), stat.st_size, stat.st_mtime_ns,
            os.path.abspath(self.image_folder), self.limit,
        )  # fmt: skip
        return table


class _ColumnTable(Sequence):
    """Adapts a `datasets.Dataset` with question/answer (or conversation) columns."""

    def __init__(self, ds, source: HFDataset):
        self.ds, self.src = ds, source

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        row, s = self.ds[i], self.src
        where = f"{s.path} row {i}"
        image = row.get(s.image_column) if s.image_column else None
        images = [image.convert("RGB")] if image is not None else []
        if s.conversations_column:
            messages = conversation_to_messages(row[s.conversations_column], where)
        else:
            answer = row[s.answer_column]
            answer = answer[0] if isinstance(answer, list) else answer
            if answer is None or not str(answer).strip():
                raise DataError(f"{where}: empty '{s.answer_column}'; every sample needs an answer")
            messages = [
                {"role": "user", "content": str(row[s.question_column])},
                {"role": "assistant", "content": str(answer)},
            ]
        refs = row.get(s.answers_column) if s.answers_column else None
        refs = refs or [next(m["content"] for m in reversed(messages) if m["role"] == "assistant")]
        return {"id": str(row.get("id", i)), "images": images, "messages": messages, "answers": list(refs)}


class HFDataset(Source):
    """A Hugging Face dataset saved with `save_to_disk`, or local data files (json, parquet, csv).

    Args:
        path: a `save_to_disk` folder, or a builder name ("json", "parquet", ...) used with data_files.
        split: split to use.
        data_files: local files for a builder name.
        image_column: column holding a PIL image (None for text-only).
        question_column: the question text.
        answer_column: the answer text (or a list: its first item is trained on).
        answers_column: optional list of references for evaluation.
        conversations_column: use LLaVA-style conversations from this column instead of Q/A columns.
        limit: keep only the first `limit` rows.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        data_files: str | list[str] | None = None,
        image_column: str | None = "image",
        question_column: str = "question",
        answer_column: str = "answer",
        answers_column: str | None = None,
        conversations_column: str | None = None,
        limit: int | None = None,
    ):
        self.path, self.split, self.data_files, self.limit = path, split, data_files, limit
        self.image_column, self.question_column, self.answer_column = (
            image_column,
            question_column,
            answer_column,
        )
        self.answers_column, self.conversations_column = answers_column, conversations_column

    def describe(self):
        return self.path

    def load(self):
        import datasets

        if os.path.isdir(self.path):
            ds = datasets.load_from_disk(self.path)
            ds = ds[self.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(self.path, data_files=self.data_files, split=self.split)
        needed = (
            [self.conversations_column]
            if self.conversations_column
            else [self.question_column, self.answer_column]
        )
        needed += [c for c in (self.image_column, self.answers_column) if c]
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{self.path}: columns {missing} not found (has {ds.column_names}); set the *_column options"
            )
        if self.limit is not None:
            ds = ds.select(range(min(self.limit, len(ds))))
        return self._table(ds)

    def _table(self, ds) -> _ColumnTable:
        table = _ColumnTable(ds, self)
        # `datasets` fingerprints a dataset by its files (or its saved state): the data.cache_processed key.
        columns = [self.image_column, self.question_column, self.answer_column, self.conversations_column]
        table.fingerprint = digest("hf", ds._fingerprint, len(ds), columns)
        return table


class Synthetic(HFDataset):
    """Offline PIL-drawn scenes of coloured shapes (see `mllm_cl.data.synthetic`), cached with `datasets`.

    Args:
        skill: count, colour, shape, spatial, classify, count_ood_text or colour_ood_text.
        n: number of samples.
        seed: generator seed (use different seeds for train and eval splits).
        image_size: canvas side in pixels.
        style: image domain: plain, noisy or dark.
        object_size: (min, max) object side as fractions of the canvas side.
    """

    def __init__(
        self,
        skill: str,
        n: int = 1000,
        seed: int = 0,
        image_size: int = 64,
        style: str = "plain",
        object_size: tuple[float, float] = (0.125, 0.25),
    ):
        super().__init__(path=f"synthetic:{skill}/{style}/seed{seed}")
        self.skill, self.n, self.seed, self.image_size, self.style = skill, n, seed, image_size, style
        self.object_size = tuple(object_size)

    def load(self):
        from mllm_cl.data.synthetic import synthetic_dataset

        try:
            ds = synthetic_dataset(
                self.skill,
                self.n,
                self.seed,
                image_size=self.image_size,
                style=self.style,
                object_size=self.object_size,
            )
        except ValueError as err:
            raise DataError(f"Synthetic({self.skill}): {err}") from err
        return self._table(ds)


class _Concat(Sequence):
    def __init__(self, tables: list):
        self.tables = tables
        prints = [getattr(t, "fingerprint", None) for t in tables]
        self.fingerprint = None if None in prints else digest("concat", *prints)
        self.offsets = [0]
        for t in tables:
            self.offsets.append(self.offsets[-1] + len(t))

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.tables[k][i - self.offsets[k]]


class Mix(Source):
    """Several sources trained as one task (e.g. a base stage that knows several skills).

    The task sampler shuffles across all of them; for a fixed mixing *ratio* use the data-hybrid
    strategy instead.

    Args:
        sources: the sources, concatenated.
    """

    def __init__(self, sources: list[Source]):
        if not sources:
            raise DataError("Mix.sources is empty; list at least one source")
        self.sources = sources

    def describe(self):
        return "Mix(" + ", ".join(s.describe() for s in self.sources) + ")"

    def load(self):
        return _Concat([s.load() for s in self.sources])
