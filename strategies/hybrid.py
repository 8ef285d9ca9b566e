"""Data-hybrid training (Li et al., "Fine-tuning MLLMs Without Forgetting Is Easier Than You Think").

Every task trains on its own data mixed with other sources at fixed ratios r_k (the paper
interleaves two sources with probabilities [1−r, r], r = 0.5 by default; 0.1 and 0.2 also tried).

Epoch semantics (our choice): the task's step count stays as configured, so it still consumes
L = steps × accumulation × batch × world samples. We build a table of exactly L items in which
``round(r_k·L)`` come from source k and the rest from the task (largest-remainder rounding, so the
counts sum to L); items of each part are drawn in seeded reshuffled passes over that part. The
TaskSampler then takes one shuffled pass over this table, so the ratio is exact over the task and
each batch is a uniform draw from it (hypergeometric, mean r_k). Every rank builds the same table
and the sampler hands each a disjoint slice, so multi-process runs see the same composition.
With ``epochs`` instead of ``steps`` the task's own data is then seen (1 − Σr) times as often.

Only the drawn samples are touched: the indices are drawn first (seeded, as above), then each
source is narrowed to the samples drawn from it (`only_drawn`), so with ``data.cache_processed``
a task over LLaVA-665k tokenises its 80 drawn samples, not 665,000 (one cache entry per task).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mllm_cl.data.sources import Source
from mllm_cl.data.tables import Subset
from mllm_cl.errors import ConfigError
from strategies.base import MemoryTerm, Strategy


class Composed(Sequence):
    """A table whose item j is ``tables[refs[j][0]][refs[j][1]]``."""

    def __init__(self, tables: list, refs: list[tuple[int, int]]):
        self.tables, self.refs = tables, refs

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, j):
        k, i = self.refs[j]
        return self.tables[k][i]


def split_counts(total: int, ratios: Sequence[float]) -> list[int]:
    """Integer counts per part (own data first) summing to `total`, by largest remainder."""
    shares = [1.0 - sum(ratios), *ratios]
    counts = [int(s * total) for s in shares]
    order = sorted(range(len(shares)), key=lambda k: shares[k] * total - counts[k], reverse=True)
    for k in order[: total - sum(counts)]:
        counts[k] += 1
    return counts


def draws(size: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices into a table of `size`: reshuffled passes, so no item repeats before all are used."""
    out: list[int] = []
    while len(out) < count:
        perm = list(range(size))
        rng.shuffle(perm)
        out += perm
    return out[:count]


def compose(tables: list, ratios: Sequence[float], total: int, seed: int) -> Composed:
    """`total` items: share ratios[k] from tables[k + 1], the rest from tables[0], in seeded order."""
    rng, refs = random.Random(seed), []
    for k, count in enumerate(split_counts(total, ratios)):
        refs += [(k, i) for i in draws(len(tables[k]), count, rng)]
    rng.shuffle(refs)
    return Composed(tables, refs)


def only_drawn(mixed: Composed, data, names: list[str]) -> Composed:
    """The same items, each mixed-in table narrowed to the samples drawn from it and passed through
    the processed-data cache (`data`: a `mllm_cl.context.TaskData`; `names[k]` describes table k + 1).
    Table 0 (the task's own data, cached by the stream already) is kept as it is."""
    tables, position = [mixed.tables[0]], [None]
    for k, (table, name) in enumerate(zip(mixed.tables[1:], names, strict=True), 1):
        drawn = sorted({i for t, i in mixed.refs if t == k})
        tables.append(data.cached(Subset(table, drawn), f"{name} ({len(drawn)} drawn)"))
        position.append({i: p for p, i in enumerate(drawn)})
    return Composed(tables, [(k, i if k == 0 else position[k][i]) for k, i in mixed.refs])


def check_ratios(name: str, ratios: Sequence[float]) -> None:
    if any(r < 0 for r in ratios) or sum(ratios) >= 1:
        raise ConfigError(
            f"{name}: ratios {list(ratios)} must be >= 0 and sum to < 1 (the rest is the task's own data)"
        )


class DataHybrid(Strategy):
    """Mix other data into every task at fixed ratios (e.g. the base skills' data, r = 0.25).

    Args:
        sources: the data mixed in (any `mllm_cl.data.Source`).
        ratios: fraction of every task's samples drawn from each source.
        seed: seed of the mixing order (combined with the task index).
    """

    def __init__(self, sources: list[Source], ratios: list[float], seed: int = 0):
        if len(sources) != len(ratios) or not sources:
            raise ConfigError(
                f"DataHybrid: {len(sources)} sources but {len(ratios)} ratios; give one ratio per source"
            )
        check_ratios("DataHybrid", ratios)
        self.sources, self.ratios, self.seed = sources, list(ratios), seed
        self._tables: list | None = None

    def tables(self) -> list:
        if self._tables is None:  # loaded once, on first use (sources may be large)
            self._tables = [s.load() for s in self.sources]
            for s, t in zip(self.sources, self._tables, strict=True):
                if len(t) == 0:
                    raise ConfigError(f"DataHybrid: source {s.describe()} has no samples; fix its path")
        return self._tables

    def mix(self, data, task: int, table: Sequence[dict]) -> Composed:
        """Task `task`'s items: drawn from `table` and the sources, then only the drawn ones kept."""
        total = data.task_samples(task)
        mixed = compose([table, *self.tables()], self.ratios, total, self.seed * 1000 + task)
        names = [f"DataHybrid source {s.describe()}, task {task}" for s in self.sources]
        return only_drawn(mixed, data, names)

    def cached_tables(self, data) -> list:
        """What each task draws from each source (the `cache` command builds these ahead of a fit)."""
        return [
            drawn
            for task in range(len(data.tasks))
            for drawn in self.mix(data, task, data.train_table(task)).tables[1:]
        ]

    def train_data(self, ctx, task: int, table: Sequence[dict]) -> Sequence[dict]:
        return self.mix(ctx.data, task, table)

    def memory(self, plan) -> list[MemoryTerm]:
        mixed = max((n or 0 for n in plan.task_samples), default=0)
        terms = [
            MemoryTerm(
                "hybrid mixing table",
                mixed * 120,  # a (source, index) tuple per sample, as Replay's references
                "one reference per sample of the largest task (0 when its size is unknown)",
                where="host",
            )
        ]
        for k, source in enumerate(self.sources):  # loaded in full by every training process
            nbytes, note = plan.table_bytes(source)
            terms.append(
                MemoryTerm(f"hybrid source {k}", nbytes, f"{source.describe()}: {note}", where="host")
            )
        return terms
