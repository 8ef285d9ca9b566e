"""The task stream: an ordered list of tasks plus held-out eval sets checked after every task.

One Lightning `fit` covers the whole stream and each *epoch is one task*: Lightning reloads the
train dataloader every epoch and we hand it the current task's data. Keeping one `fit` matters:
Lightning's FSDP cannot reuse a module after `fit` ends (Lightning #19015, #20255), so the model
is wrapped once and trained through every task, and a checkpoint's epoch is the task position.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mllm_cl.checkpointing import resume_offset
from mllm_cl.data.cache import cache_root, tokenized
from mllm_cl.data.collate import Encoder
from mllm_cl.data.meta import eval_meta
from mllm_cl.data.sources import Source
from mllm_cl.data.tables import tokens_view
from mllm_cl.errors import DataError
from mllm_cl.evaluation import EvalColumn, resolve_column
from mllm_cl.validate_data import check_mode, check_stream


@dataclass
class Task:
    """One skill of the stream.

    Args:
        name: short name, used in the accuracy matrix and TensorBoard tags.
        train: where the training samples come from.
        eval: the task's own eval set (its column in the accuracy matrix).
        steps: optimizer steps for this task (overrides `epochs`).
        epochs: passes over `train` when `steps` is not given.
        metric: answer metric of the eval set (see `mllm_cl.metrics.build_metric`; default: the
            source's benchmark preset, else exact_match).
        metric_args: keyword arguments of the metric, e.g. {"labels": [...]} for emt.
        eval_batch_size: prompts per generation batch of the eval set (default: data.eval_batch_size).
        max_new_tokens: generation budget of the eval set (default: the preset's, else model.max_new_tokens).
        stop: strings that end an answer (generation stops early; the answer is cut before them).
    """

    name: str
    train: Source
    eval: Source | None = None
    steps: int | None = None
    epochs: float = 1.0
    metric: str | None = None
    metric_args: dict | None = None
    eval_batch_size: int | None = None
    max_new_tokens: int | None = None
    stop: list[str] | None = None


@dataclass
class EvalSet:
    """A held-out benchmark watched after every task.

    Args:
        name: column name in the accuracy matrix.
        data: the samples.
        metric: answer metric (see `mllm_cl.metrics.build_metric`; default: the source's benchmark
            preset, else exact_match).
        image_domain: "id" or "ood" relative to the training images (2x2 report).
        text_domain: "id" or "ood" relative to the training questions.
        metric_args: keyword arguments of the metric, e.g. {"labels": [...]} for emt.
        eval_batch_size: prompts per generation batch (default: data.eval_batch_size).
        max_new_tokens: generation budget (default: the preset's, else model.max_new_tokens).
        stop: strings that end an answer (generation stops early; the answer is cut before them).
    """

    name: str
    data: Source
    metric: str | None = None
    image_domain: str = "id"
    text_domain: str = "id"
    extra: dict = field(default_factory=dict)
    metric_args: dict | None = None
    eval_batch_size: int | None = None
    max_new_tokens: int | None = None
    stop: list[str] | None = None


class _Head(Sequence):
    """The first `limit` samples of a table (all of them when limit is None)."""

    def __init__(self, table, limit: int | None):
        self.table, self.n = table, len(table) if limit is None else min(limit, len(table))
        inner = getattr(table, "fingerprint", None)  # the processed-data cache key of these n samples
        self.fingerprint = None if inner is None else f"{inner}[:{self.n}]"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.table[i]

    def tokens_view(self, i: int) -> dict:  # building a cache of eval prompts decodes no image
        return tokens_view(self.table, i)


class _Encoded(Dataset):
    """Encodes samples lazily, in the dataloader workers (image decoding off the main process)."""

    def __init__(self, table, fn):
        self.table, self.fn = table, fn

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return self.fn(self.table[i])


class _EvalItems(Dataset):
    def __init__(self, table, encoder: Encoder, indices: list[int]):
        self.table, self.encoder, self.indices = table, encoder, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        sample = self.table[abs(i) - 1]
        item = self.encoder.encode_prompt(sample)
        # Negative index = padding so every rank runs the same number of batches; not scored.
        item["meta"] = eval_meta(sample, scored=i > 0)
        return item


class _RankLocal(DistributedSampler):
    """Marks a sampler that already yields this rank's share only.

    Lightning wraps any other sampler in a DistributedSampler under DDP/FSDP (`use_distributed_sampler`),
    which would split our per-rank share again: each rank would see half of it and a task would run
    half its steps. A DistributedSampler subclass is left alone. No DistributedSampler state is used.
    """

    def set_epoch(self, epoch: int) -> None:  # called by Lightning; the order depends on the task seed
        self.epoch = epoch


class _InOrder(_RankLocal):
    """0..n-1 in order (an eval loader's items, already this rank's share)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


class TaskSampler(_RankLocal):
    """Seeded sample order for one task: reshuffled passes until `num_samples`, this rank's share.

    The global order depends only on (seed, task index), so each rank takes a disjoint slice and a
    resumed run can skip exactly the samples already seen.
    """

    def __init__(self, size: int, num_samples: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.size, self.num_samples, self.seed, self.rank, self.world = size, num_samples, seed, rank, world
        self.start = start  # samples of this rank's share already trained (mid-task resume)

    def global_order(self) -> list[int]:
        rng, order = random.Random(self.seed), []
        while len(order) < self.num_samples * self.world:
            perm = list(range(self.size))
            rng.shuffle(perm)
            order += perm
        return order[: self.num_samples * self.world]

    def __iter__(self):
        return iter(self.global_order()[self.rank :: self.world][self.start :])

    def __len__(self):
        # The full length even when resuming: Lightning's restored batch counters count from the task's start.
        return self.num_samples


def _own_generator() -> torch.Generator:
    # Workers' seeds from the loader's own RNG, not the global one: a resumed run creates loaders at
    # other moments than an uninterrupted one, which would shift the global random stream.
    return torch.Generator().manual_seed(0)


class TaskStream(L.LightningDataModule):
    """Ordered tasks plus held-out eval sets, for sequential fine-tuning in one `fit`.

    Args:
        tasks: the skills, trained in order.
        heldout: benchmarks not trained on, evaluated before the first task and after every task.
        batch_size: training samples per device per micro-batch.
        eval_batch_size: prompts per generation batch.
        num_workers: dataloader worker processes (decode and tokenise off the main process).
        max_length: longest training sequence in tokens.
        overlength: "skip" (counted), "truncate" or "error" for longer samples.
        eval_limit: evaluate at most this many samples per eval set (None = all).
        seed: seed of the sample order (combined with the task index).
        cache_processed: keep the tokenised training data in a `datasets` cache, so a second run does
            not re-tokenise (images are still processed on the fly; see `mllm_cl.data.cache`).
        cache_dir: folder of that cache (default: $MLLM_CL_CACHE or ~/.cache/mllm_cl).
        validate: checks of every set before the model loads (`mllm_cl.validate_data`): "fast"
            opens every image without decoding it, "full" decodes every image, "off" skips them.
        max_unk_answers: largest fraction of a set's answers that may contain a token the model's
            tokenizer maps to its unknown token; above it the run stops before training.
    """

    def __init__(
        self,
        tasks: list[Task],
        heldout: list[EvalSet] | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        max_length: int = 2048,
        overlength: str = "skip",
        eval_limit: int | None = None,
        seed: int = 0,
        cache_processed: bool = False,
        cache_dir: str | None = None,
        validate: str = "fast",
        max_unk_answers: float = 0.01,
    ):
        super().__init__()
        if not tasks:
            raise DataError("data.tasks is empty; list at least one task")
        if overlength not in ("skip", "truncate", "error"):
            raise DataError(f"data.overlength={overlength!r}; use skip, truncate or error")
        self.tasks, self.heldout = tasks, list(heldout or [])
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_length, self.overlength, self.eval_limit, self.seed = (
            max_length,
            overlength,
            eval_limit,
            seed,
        )
        self.cache_processed, self.cache_dir = cache_processed, cache_dir
        check_mode(validate, max_unk_answers)
        self.validate, self.max_unk_answers = validate, max_unk_answers
        self.encoder: Encoder | None = None
        self._tokenized: set[str] = set()  # which tables read from the processed-data cache
        self._train: list | None = None
        self._eval: list[EvalColumn] | None = None

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self, stage: str):
        self.prepare_tables(self.trainer.lightning_module, stage)
        if stage == "fit":
            # Epoch i is task i: a fresh train loader each epoch, and the stream's end is the fit's end.
            self.trainer.fit_loop.max_epochs = len(self.tasks)
            self.trainer.reload_dataloaders_every_n_epochs = 1

    def prepare_tables(self, module, stage: str = "fit") -> None:
        """Load every source, make the encoder, and (data.cache_processed) read or build the caches:
        eval prompts always, training samples for `fit`."""
        if self._train is None:
            self._train = [
                self._load(t.train, f"data.tasks[{i}].train ({t.name})") for i, t in enumerate(self.tasks)
            ]
            self._eval = [
                resolve_column(
                    name, src, owner, _Head(self._load(src, f"eval set {name}"), self.eval_limit), domains
                )
                for name, src, owner, domains in self.eval_specs()
            ]
            for column in self._eval:
                column.check()  # metric names, args, domains and references: before any model work
            check_stream(self, module.processor, stage)  # images, <image> counts, unknown tokens
        self.encoder = Encoder(module.family, module.processor, self.max_length, self.overlength)
        if self.cache_processed and "eval" not in self._tokenized:
            for column in self._eval:
                column.table = self.tokenized(column.table, f"eval set {column.name}", prompt=True)
            self._tokenized.add("eval")
        if stage == "fit" and self.cache_processed and "train" not in self._tokenized:
            self._train = [
                self.tokenized(table, f"data.tasks[{i}] ({t.name})")
                for i, (t, table) in enumerate(zip(self.tasks, self._train, strict=True))
            ]
            self._tokenized.add("train")

    @staticmethod
    def _load(source: Source, where: str):
        table = source.load()
        if len(table) == 0:
            raise DataError(f"{where}: {source.describe()} has no samples; fix the path or drop the task")
        return table

    def eval_specs(self) -> list[tuple[str, Source, object, tuple[str, str]]]:
        """(column name, source, owner, (image, text) domain) per column: tasks, then held-out.

        A task's own eval set is in-domain on both axes by construction."""
        specs = [(t.name, t.eval, t, ("id", "id")) for t in self.tasks if t.eval is not None]
        return specs + [(h.name, h.data, h, (h.image_domain, h.text_domain)) for h in self.heldout]

    @property
    def eval_names(self) -> list[str]:
        return [spec[0] for spec in self.eval_specs()]

    @property
    def columns(self) -> list[EvalColumn]:
        """The eval columns (after `prepare_tables`): samples, metric, generation options, domains."""
        if self._eval is None:
            raise RuntimeError("TaskStream.columns is available after prepare_tables (setup)")
        return self._eval

    def task_column(self, task_index: int) -> str | None:
        return self.tasks[task_index].name if self.tasks[task_index].eval is not None else None

    def tokenized(self, table, where: str, prompt: bool = False):
        """`table` reading its tokens from the processed-data cache (itself when caching is off)."""
        if not self.cache_processed:
            return table
        root = Path(self.cache_dir) if self.cache_dir else cache_root()
        return tokenized(table, self.encoder, root, self.trainer, self.num_workers, where, prompt)

    # ---- training ---------------------------------------------------------------------------
    def train_table(self, task_index: int):
        """The training samples of a task as loaded (before strategies mix anything in)."""
        return self._train[task_index]

    def steps_for(self, task_index: int) -> int:
        """Optimizer steps of a task (what its LR schedule spans)."""
        task = self.tasks[task_index]
        if task.steps is not None:
            return task.steps
        return max(1, int(len(self._train[task_index]) * task.epochs) // self._samples_per_step())

    def samples_for(self, task_index: int) -> int:
        """Samples a task consumes over all ranks (what a data-hybrid mix or replay must supply)."""
        return self.steps_for(task_index) * self._samples_per_step()

    def _samples_per_step(self) -> int:
        """Samples per optimizer step over all ranks (the trainer's when attached, else one process)."""
        world = self.trainer.world_size if self.trainer else 1
        return self.batch_size * world * self._accumulate()

    def _accumulate(self) -> int:
        return self.trainer.accumulate_grad_batches if self.trainer else 1

    def train_dataloader(self):
        index = min(self.trainer.current_epoch, len(self.tasks) - 1)
        module, table = self.trainer.lightning_module, self._train[index]
        for strategy in module.all_strategies:
            table = strategy.train_data(module.context, index, table)
        num = self.steps_for(index) * self._accumulate() * self.batch_size
        sampler = TaskSampler(
            len(table),
            num,
            self.seed * 1000 + index,
            self.trainer.global_rank,
            self.trainer.world_size,
            start=resume_offset(self.trainer) * self.batch_size,
        )
        return DataLoader(
            _Encoded(table, self.encoder.encode_train),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.encoder.collate,
            num_workers=self.num_workers,
            drop_last=False,
            generator=_own_generator(),
        )

    # ---- evaluation -------------------------------------------------------------------------
    def eval_loader(self, column: int, rank: int = 0, world: int = 1) -> DataLoader:
        """Prompts of one eval set, this rank's share, padded so every rank runs as many batches."""
        col = self._eval[column]
        table, n = col.table, len(col.table)
        per_rank = -(-n // world)
        indices = [i + 1 if i < n else -((i % n) + 1) for i in range(per_rank * world)][rank::world]
        return DataLoader(
            _EvalItems(table, self.encoder, indices),
            sampler=_InOrder(len(indices)),
            batch_size=col.eval_batch_size or self.eval_batch_size,
            collate_fn=self._collate_eval,
            num_workers=self.num_workers,
            generator=_own_generator(),
        )

    def _collate_eval(self, items):
        batch = self.encoder.collate(items, padding_side="left")
        batch["meta"] = [x["meta"] for x in items]
        return batch

    def val_dataloader(self):
        # During fit the stream evaluates itself at task boundaries; `validate` uses these loaders.
        if self.trainer.state.fn == "fit":
            return []
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return [self.eval_loader(c, rank, world) for c in range(len(self._eval))]

    test_dataloader = val_dataloader

    def state_dict(self):
        return {"seed": self.seed, "tasks": [t.name for t in self.tasks]}

    def load_state_dict(self, state):
        if state.get("tasks") and state["tasks"] != [t.name for t in self.tasks]:
            raise DataError(
                f"checkpoint was made for tasks {state['tasks']}, config has {[t.name for t in self.tasks]}"
            )
