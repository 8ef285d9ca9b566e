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
import os
from collections.abc import Sequence

from mllm_cl.data.cache import digest
from mllm_cl.data.llava import load_llava
from mllm_cl.data.synthetic import synthetic_dataset
from mllm_cl.data.tables import ImageRef, conversation_to_messages, last_answer, tokens_view
from mllm_cl.errors import DataError

__all__ = ["Source", "LlavaJson", "HFDataset", "Synthetic", "Mix", "conversation_to_messages"]


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


class LlavaJson(Source):
    """LLaVA conversation data: a JSON list or JSONL file plus an image folder.

    Each record: ``{"id": ..., "image": "rel/path.jpg" (or a list, or absent for text-only),
    "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}``.
    An optional ``"answers"`` list gives several references for evaluation (VQA).

    The file is converted once into a memory-mapped Arrow table, checked record by record (see
    `mllm_cl.data.llava`); later runs, ranks and dataloader workers share that table.

    Args:
        path: the .json or .jsonl file.
        image_folder: folder that image paths are relative to (default: the file's folder).
        limit: keep only the first `limit` records.
        num_proc: processes that check records during the conversion (default: up to 8 for files
            of 20,000 records or more, else 1).
        cache_dir: where the converted table is kept (default: $MLLM_CL_CACHE or ~/.cache/mllm_cl).
    """

    def __init__(
        self,
        path: str,
        image_folder: str | None = None,
        limit: int | None = None,
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ):
        self.path, self.limit, self.num_proc, self.cache_dir = path, limit, num_proc, cache_dir
        self.image_folder = image_folder if image_folder is not None else os.path.dirname(path)

    def describe(self):
        return self.path

    def load(self):
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: file not found; fix the path in your config")
        table = load_llava(self.path, self.image_folder, self.limit, self.num_proc, self.cache_dir)
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
        image = row.get(s.image_column) if s.image_column else None
        return self._sample(row, i, [image.convert("RGB")] if image is not None else [])

    def tokens_view(self, i: int) -> dict:
        """Sample i with its image undecoded (raw Arrow row: the encoded bytes or the file path)."""
        if not hasattr(self, "_raw"):
            self._raw = self.ds.with_format("arrow")
        row, column = self._raw[i].to_pylist()[0], self.src.image_column
        image = row.get(column) if column else None
        where = f"{self.src.path} row {i}"
        images = [] if image is None else [ImageRef(image.get("path"), image.get("bytes"), where)]
        return self._sample(row, i, images)

    def _sample(self, row: dict, i: int, images: list) -> dict:
        s = self.src
        where = f"{s.path} row {i}"
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
        refs = refs or [last_answer(messages)]
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

    def _locate(self, i: int) -> tuple[object, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.tables[k], i - self.offsets[k]

    def __getitem__(self, i):
        table, j = self._locate(i)
        return table[j]

    def tokens_view(self, i: int) -> dict:
        return tokens_view(*self._locate(i))


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
