"""Benchmark presets: the papers' eval sets read with `datasets`, prompted and scored as they were.

``{class_path: Benchmark, init_args: {name: chartqa}}`` gives the samples of a benchmark with the
prompt LMM_CL's lmms-eval run built (pre/post prompt, option lines) and, in ``eval_defaults``, the
metric (see ``mllm_cl.metrics.build_metric``) and LMM_CL's ``max_new_tokens`` cap. The facts (HF
ids, columns, prompt strings, caps) are from /work/shared/BENCHMARKS.md; README "Benchmarks" has
the table. Deliberate differences from upstream are noted at the presets below.

Each sample is the sources' dict (``id``, ``images``, ``messages``, ``answers``) plus ``fields``:
the per-sample values the metric needs (e.g. MMStar's ``l2_category``).
"""

from __future__ import annotations

import glob
import io
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from mllm_cl.data.cache import digest
from mllm_cl.data.sources import Source
from mllm_cl.errors import ConfigError, DataError

LETTER_POST = "Answer with the option's letter from the given choices directly."
PHRASE_POST = "\nAnswer the question using a single word or phrase."
_FORMAT_VERSION = 1  # part of every table fingerprint: bump when a prompt changes


def _options(options: Sequence[str]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {text}" for i, text in enumerate(options))


def _letter_of_index(row: dict) -> list[str]:
    return [chr(ord("A") + int(row["answer"]))]


def _answer(row: dict) -> list[str]:
    return [] if row["answer"] is None else [str(row["answer"])]


def _all_answers(column: str) -> Callable[[dict], list[str]]:
    return lambda row: [str(a) for a in row[column] or []]  # a split without answers -> DataError


@dataclass(frozen=True)
class Preset:
    """How one benchmark is read, prompted and scored."""

    hf_id: str
    config: str | None
    split: str
    columns: tuple[str, ...]  # read by the preset; checked on load
    prompt: Callable[[dict], str]
    metric: str
    max_new_tokens: int
    answers: Callable[[dict], list[str]] = _answer
    fields: tuple[str, ...] = ()  # columns handed to the metric per sample
    id_column: str | None = None
    metric_args: dict = field(default_factory=dict)
    train_split: str | None = None  # this split gives training samples (question -> answer)
    only: tuple[str, str] | None = None  # (column, value): keep only these rows


def _seed_prompt(row: dict) -> str:
    choices = [row[f"choice_{c}"] for c in "abcd"]
    return f"{row['question']}\n{_options(choices)}\n{LETTER_POST}"


def _scienceqa_prompt(row: dict) -> str:
    context = f"Context: {row['hint']}\n" if row["hint"] else ""  # no Context line without a hint
    return f"{context}{row['question']}\n{_options(row['choices'])}\n{LETTER_POST}"


# LMM_CL's cub200 / pixmocount / timeclock tasks declare doc_to_text(doc, pre_prompt, post_prompt)
# but lmms-eval passes its kwargs dict positionally, so as executed the prompt is
# str(kwargs dict) + question with no post-prompt. We build the intended pre + question + post.
PRESETS: dict[str, Preset] = {
    "cub200": Preset(
        "Jessemel/cub200-test", None, "train", ("image", "question", "answer"),
        # The post-prompt has no leading newline in LMM_CL's YAML; kept.
        lambda r: r["question"].replace("\n<image>", "").replace("<image>", "") + LETTER_POST,
        "cub_letter", 16,
    ),
    "pixmocount": Preset(
        "Jessemel/pixmocount-test", None, "train", ("image", "question", "answer"),
        lambda r: r["question"].replace("\n<image>", "")
        + "\nAnswer with integer and nothing else. For example, if the answer is 1, you should output 1.",
        "pixmocount", 16,
    ),
    "pathvqa": Preset(
        "flaviagiammarino/path-vqa", None, "test", ("image", "question", "answer"),
        lambda r: "Look at the medical image and answer the following question: " + r["question"]
        + "\nFor questions that can be answered with a yes or no, just answer yes or no. "
        "Otherwise, provide an answer in the medical domain.",
        "pathvqa", 64, fields=("question",), train_split="train",
    ),
    "textvqa": Preset(
        "lmms-lab/textvqa", None, "validation", ("image", "question", "answers"),
        # str.capitalize also lower-cases the rest of the question, as upstream.
        lambda r: r["question"].capitalize() + PHRASE_POST,
        "vqa", 64, answers=_all_answers("answers"), id_column="question_id",
        train_split="train",
    ),
    "timeclock": Preset(
        "AvaXiao/clockreading-time", None, "train", ("image", "question", "answer"),
        lambda r: r["question"].replace("\n<image>", "")
        + "\nAnswer with the time in HH:MM format. For example, if it's 3:45, output 3:45.",
        "timeclock", 32,
    ),
    "ai2d": Preset(
        "lmms-lab/ai2d", None, "test", ("image", "question", "options", "answer"),
        lambda r: f"{r['question']}\n{_options(r['options'])}\n{LETTER_POST}",
        "ai2d_letter", 16, answers=_letter_of_index,
    ),
    "chartqa": Preset(
        "lmms-lab/ChartQA", None, "test", ("image", "question", "answer", "type"),
        lambda r: r["question"] + "\nAnswer the question with a single word.",
        "relaxed_accuracy", 16, fields=("type",),
    ),
    "docvqa_val": Preset(
        "lmms-lab/DocVQA", "DocVQA", "validation", ("image", "question", "answers"),
        lambda r: r["question"] + PHRASE_POST,
        "anls", 32, answers=_all_answers("answers"), id_column="questionId",
    ),
    "infovqa_val": Preset(
        "lmms-lab/DocVQA", "InfographicVQA", "validation", ("image", "question", "answers"),
        lambda r: r["question"] + PHRASE_POST,
        "anls", 32, answers=_all_answers("answers"), id_column="questionId",
    ),
    "realworldqa": Preset(
        "lmms-lab/RealWorldQA", None, "test", ("image", "question", "answer"),
        lambda r: r["question"].strip(),  # options and instruction are in the question
        "realworldqa", 16,
    ),
    "scienceqa_img": Preset(
        "lmms-lab/ScienceQA", "ScienceQA-IMG", "test", ("image", "hint", "question", "choices", "answer"),
        _scienceqa_prompt, "scienceqa_letter", 16, answers=_letter_of_index,
    ),
    "mmstar": Preset(
        "Lin-Chen/MMStar", None, "val", ("image", "question", "answer", "l2_category"),
        # No final period: MMStar's post-prompt lacks it upstream.
        lambda r: r["question"].strip().replace(" Please answer yes or no.", "")
        + "\nAnswer with the option's letter from the given choices directly",
        "mmstar", 32, fields=("l2_category",), id_column="index",
    ),
    "ocrbench": Preset(
        "echo840/OCRBench", None, "test", ("image", "question", "answer", "dataset"),
        lambda r: r["question"].strip(),
        "ocrbench", 64, answers=_all_answers("answer"), fields=("dataset",),
    ),
    "seedbench": Preset(
        "lmms-lab/SEED-Bench", None, "test",
        ("image", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type"),
        _seed_prompt, "seed_letter", 16, id_column="question_id", only=("data_type", "image"),
    ),
}  # fmt: skip


def _images(value, where: str) -> list[Image.Image]:
    """A row's image cell as RGB images: one PIL image, a list of them (SEED-Bench) or None."""
    if value is None:
        return []
    if isinstance(value, list):
        return [img for v in value for img in _images(v, where)]
    if isinstance(value, dict) and value.get("bytes"):  # an image column stored without its type
        value = Image.open(io.BytesIO(value["bytes"]))
    if not isinstance(value, Image.Image):
        raise DataError(f"{where}: column 'image' holds {type(value).__name__}, not an image")
    return [value.convert("RGB")]


class _BenchmarkTable(Sequence):
    """Builds samples row by row, so images are decoded only when a sample is read."""

    def __init__(self, ds, rows: Sequence[int], bench: Benchmark):
        self.ds, self.rows, self.bench = ds, rows, bench

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        index, p = int(self.rows[i]), self.bench.preset
        where = f"{self.bench.describe()} row {index}"
        try:
            row = self.ds[index]  # decodes this row's images only
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"{where}: cannot be read ({err}); fix or drop the row") from err
        answers = [a for a in p.answers(row) if a is not None]
        if not answers:
            raise DataError(f"{where}: no reference answer; fix the data or drop the row")
        if self.bench.training:
            question = row["question"]  # LMM_CL's converters: "<image>\n" + question -> answer
            answer = Counter(answers).most_common(1)[0][0]  # TextVQA: the most common of the 10
        else:
            question, answer = p.prompt(row), answers[0]
        return {
            "id": str(row[p.id_column]) if p.id_column else str(index),
            "images": _images(row.get("image"), where),
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "answers": answers,
            "fields": {name: row[name] for name in p.fields},
        }


class Benchmark(Source):
    """A benchmark of the papers (LMM_CL's 5 tasks, 9 held-out sets), prompted and scored as they were.

    Args:
        name: cub200, pixmocount, pathvqa, textvqa, timeclock (LMM_CL's tasks) or ai2d, chartqa,
            docvqa_val, infovqa_val, realworldqa, scienceqa_img, mmstar, ocrbench, seedbench.
        split: dataset split; default the preset's eval split. ``train`` for pathvqa / textvqa gives
            training samples (question -> answer; TextVQA's most common answer), as LMM_CL's converters.
        path: local copy for offline clusters: a ``save_to_disk`` folder, or parquet file(s) or a folder
            of them (a hub snapshot works: the config subfolder and the split's files are picked).
            Default: ``datasets.load_dataset(hf_id, config, split=split)`` from the hub.
        limit: keep only the first ``limit`` samples.
    """

    def __init__(
        self,
        name: str,
        split: str | None = None,
        path: str | list[str] | None = None,
        limit: int | None = None,
    ):
        if name not in PRESETS:
            raise ConfigError(f"Benchmark name {name!r} is unknown; choose one of {', '.join(PRESETS)}")
        self.name, self.path, self.limit = name, path, limit
        self.split = split or self.preset.split
        self.training = self.split == self.preset.train_split

    @property
    def preset(self) -> Preset:
        # Looked up, not stored: presets hold lambdas, and tables must pickle (dataloader workers).
        return PRESETS[self.name]

    def describe(self) -> str:
        return f"Benchmark({self.name}, split={self.split})"

    @property
    def eval_defaults(self) -> dict:
        """The preset's metric, metric_args and max_new_tokens (LMM_CL's generation cap)."""
        p = self.preset
        return {"metric": p.metric, "metric_args": dict(p.metric_args), "max_new_tokens": p.max_new_tokens}

    def load(self) -> Sequence[dict]:
        ds = self._dataset()
        missing = [c for c in self.preset.columns if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{self.describe()} from {self.path or self.preset.hf_id}: columns {missing} not found "
                f"(has {ds.column_names}); point path at the {self.preset.hf_id} data"
            )
        rows: Sequence[int] = range(len(ds))
        if self.preset.only:  # reads one column only, no images
            column, value = self.preset.only
            rows = [i for i, v in enumerate(ds.select_columns(column)[column]) if v == value]
        rows = rows[: self.limit] if self.limit is not None else rows
        table = _BenchmarkTable(ds, rows, self)
        # `datasets` fingerprints a dataset by its files: the data.cache_processed key.
        table.fingerprint = digest(
            "benchmark", _FORMAT_VERSION, self.name, self.split, ds._fingerprint, len(ds), self.limit
        )
        return table

    def _dataset(self):
        import datasets

        p = self.preset
        if self.path is None:
            return datasets.load_dataset(p.hf_id, p.config, split=self.split)
        paths = [self.path] if isinstance(self.path, str) else list(self.path)
        if len(paths) == 1 and _is_saved(paths[0]):
            ds = datasets.load_from_disk(paths[0])
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise DataError(f"{paths[0]}: no split {self.split!r} (has {list(ds)}); set split")
                ds = ds[self.split]
            return ds
        files = _parquet_files(paths, p.config, self.split)
        if not files:
            raise DataError(
                f"{', '.join(paths)}: neither a save_to_disk folder nor .parquet files; fix Benchmark path"
            )
        return datasets.load_dataset("parquet", data_files=files, split="train")


def _is_saved(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _parquet_files(paths: list[str], config: str | None, split: str) -> list[str]:
    """The parquet files of ``split``: those named "<split>-*" / "<split>.parquet" or under a
    "<split>" folder; all of them when none is (a folder holding one split)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            if config and os.path.isdir(os.path.join(path, config)):
                path = os.path.join(path, config)
            found += [
                (path, f) for f in sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
            ]
        elif path.endswith(".parquet") and os.path.isfile(path):
            found.append((os.path.dirname(path), path))

    def of_split(root: str, file: str) -> bool:
        parts = os.path.relpath(file, root).split(os.sep)
        name = parts[-1]
        return split in parts[:-1] or name.startswith(f"{split}-") or name == f"{split}.parquet"

    chosen = [f for root, f in found if of_split(root, f)]
    return chosen or [f for _, f in found]
