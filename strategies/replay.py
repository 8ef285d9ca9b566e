"""Experience replay: a bounded buffer of earlier tasks' samples mixed into later tasks.

The "25% replay" control of our CPU measurements and the classic rehearsal baseline (e.g.
Rolnick et al. 2019, "Experience Replay for Continual Learning"). The buffer holds (task, index)
references into earlier tasks' training tables (never the samples: they are reloaded from their
sources, so the checkpointed state is a few integers). Policies, applied at each task end:

- ``reservoir``: reservoir sampling (Vitter's algorithm R) over every training sample seen so far,
  so each has the same probability size / seen of being in the buffer;
- ``balanced``: every task seen keeps an equal share (counts equal ±1), a seeded random subset.

From the second task on, a fraction `ratio` of each task's samples comes from the buffer, with
the exact composition of `strategies.hybrid` (table of the task's length, seeded, per-rank slices).
Only the samples drawn are touched: the references are drawn first, and the items point into the
stream's own training tables (read from its processed-data cache when ``data.cache_processed`` is
on, which those tables already fill), so replay encodes nothing beyond what a task trains on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mllm_cl.errors import ConfigError
from strategies.base import MemoryTerm, Strategy
from strategies.hybrid import Composed, check_ratios, compose


class Replay(Strategy):
    """Rehearse a bounded buffer of earlier tasks' samples at a fixed ratio.

    Args:
        size: most samples (references) kept in the buffer.
        ratio: fraction of each later task's samples drawn from the buffer.
        policy: "reservoir" (uniform over all seen samples) or "balanced" (equal share per task).
        seed: seed of buffer selection and mixing order.
    """

    def __init__(self, size: int = 1000, ratio: float = 0.25, policy: str = "reservoir", seed: int = 0):
        if size < 1:
            raise ConfigError(f"Replay(size={size}): size must be >= 1")
        if policy not in ("reservoir", "balanced"):
            raise ConfigError(f"Replay(policy={policy!r}): use 'reservoir' or 'balanced'")
        check_ratios("Replay", [ratio])
        self.size, self.ratio, self.policy, self.seed = size, ratio, policy, seed
        self.buffer: list[tuple[int, int]] = []  # (task, index in that task's training table)
        self.seen = 0
        self.tasks_added: list[int] = []

    # ---- buffer -----------------------------------------------------------------------------
    def add_task(self, task: int, n: int) -> None:
        """Offer the `n` samples of `task` to the buffer (idempotent per task, for resumes)."""
        if task in self.tasks_added:
            return
        rng = random.Random(self.seed * 1000 + task)
        if self.policy == "reservoir":
            for i in range(n):
                self.seen += 1
                if len(self.buffer) < self.size:
                    self.buffer.append((task, i))
                else:
                    j = rng.randrange(self.seen)
                    if j < self.size:
                        self.buffer[j] = (task, i)
        else:
            self._rebalance(task, n, rng)
        self.tasks_added.append(task)

    def _rebalance(self, task: int, n: int, rng: random.Random) -> None:
        tasks = [*self.tasks_added, task]
        quota = {t: self.size // len(tasks) + (k < self.size % len(tasks)) for k, t in enumerate(tasks)}
        kept = {t: [e for e in self.buffer if e[0] == t][: quota[t]] for t in self.tasks_added}
        kept[task] = [(task, i) for i in rng.sample(range(n), min(n, quota[task]))]
        self.buffer = [e for t in tasks for e in kept[t]]

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for t, _ in self.buffer:
            out[t] = out.get(t, 0) + 1
        return out

    # ---- hooks ------------------------------------------------------------------------------
    def on_task_end(self, ctx, task: int) -> None:
        self.add_task(task, len(ctx.data.train_table(task)))

    def train_data(self, ctx, task: int, table: Sequence[dict]) -> Sequence[dict]:
        if not self.buffer:
            return table
        data = ctx.data  # earlier tasks' own tables, loaded (and cached) by the stream
        memory = Composed([data.train_table(k) for k in range(len(data.tasks))], list(self.buffer))
        total = data.task_samples(task)
        return compose([table, memory], [self.ratio], total, self.seed * 1000 + 500 + task)

    def memory(self, plan) -> list[MemoryTerm]:
        # (task, index) tuples: a 2-tuple (56 B) + two ints (28 B) + the list slot (8 B) in CPython.
        per_ref = 120
        mixed = max((n or 0 for n in plan.task_samples), default=0)
        return [
            MemoryTerm(
                "replay buffer",
                self.size * per_ref,
                f"{self.size:,} (task, index) references; the samples stay in the tasks' own tables",
                where="host",
            ),
            MemoryTerm(
                "replay mixing table",
                mixed * per_ref,
                "one reference per sample of the largest task (0 when its size is unknown)",
                where="host",
            ),
        ]

    def state_dict(self) -> dict:
        return {
            "buffer": [list(e) for e in self.buffer],
            "seen": self.seen,
            "tasks_added": list(self.tasks_added),
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer = [tuple(e) for e in state.get("buffer", [])]
        self.seen = state.get("seen", 0)
        self.tasks_added = list(state.get("tasks_added", []))
