"""The LightningModule: a Hugging Face image-text-to-text model trained over a task stream.

The model is built in `configure_model` (so FSDP can shard it once, after the recipe froze it)
and trained through the whole stream in one `fit`: epoch i is task i (see `mllm_cl.data.stream`).
At each task start the optimizer state is cleared and the LR schedule restarted; after each task
(and once before the first) every eval set is scored by greedy generation and a row is added to
the accuracy matrix, written to the run directory and TensorBoard.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from mllm_cl import board, checkpointing, curve, evaluation, faults, generation
from mllm_cl.context import StrategyContext
from mllm_cl.data.collate import BOOKKEEPING_KEYS
from mllm_cl.families import get_family
from mllm_cl.guards import TrainingCounters, check_policy, guard_loss
from mllm_cl.optim import TaskSchedule, param_groups, reset_optimizer_state
from mllm_cl.results import StreamResults, atomic_write
from mllm_cl.sharding import check_attn_implementation, local_log_dir, shard_model
from strategies.base import Strategy
from strategies.freeze import Full, Recipe

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MLLMModule(L.LightningModule):
    """Sequential fine-tuning of LLaVA-1.5 / Qwen2.5-VL with a freezing recipe and strategies.

    Args:
        family: model family, "llava", "qwen2_5_vl" or "llava_onevision".
        family_options: the family's options, e.g. {"system_prompt": null} or, for Qwen2.5-VL,
            {"processor_kwargs": {"max_pixels": 1003520}} (see `mllm_cl.families.base.Family`).
        pretrained: local directory or hub id of a checkpoint; None builds a tiny model.
        tiny: size of the randomly initialised model built from config when `pretrained` is None
            ("tiny" for tests, "demo" for the CPU demo).
        tiny_seed: seed of the tiny model's initialisation.
        dtype: weight dtype when loading: float32, bfloat16 or float16.
        attn_implementation: "sdpa", "flash_attention_2" or "eager".
        trust_remote_code: allow code from the checkpoint (off unless you trust it).
        recipe: which parameters are trained (a `strategies.freeze.Recipe`).
        strategies: further methods (LwF, ...) applied in order.
        lr: peak learning rate of every task.
        component_lr: per-component LR overrides, e.g. {"vision": 2e-6}.
        weight_decay: AdamW weight decay.
        warmup_ratio: warmup fraction of each task's steps.
        min_lr_ratio: final LR of the cosine as a fraction of the peak.
        max_new_tokens: generation budget when evaluating.
        gradient_checkpointing: non-reentrant activation checkpointing of the decoder layers.
        compile: `torch.compile` each transformer block (see `mllm_cl.sharding`).
        nonfinite_loss: on a NaN / inf loss, "stop" with an error naming task and step, or "skip"
            the batch (counted in train/nonfinite_skipped).
        eval_every_n_steps: also score every eval set every N optimizer steps inside a task, logged
            as `curve/<set>` and `curve.jsonl` (rows stay one per task; see `mllm_cl.curve`).
    """

    def __init__(
        self,
        family: str = "llava",
        family_options: dict | None = None,
        pretrained: str | None = None,
        tiny: str = "tiny",
        tiny_seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        recipe: Recipe | None = None,
        strategies: list[Strategy] | None = None,
        lr: float = 5e-6,
        component_lr: dict[str, float] | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        max_new_tokens: int = 16,
        gradient_checkpointing: bool = False,
        nonfinite_loss: str = "stop",
        compile: bool = False,
        eval_every_n_steps: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["recipe", "strategies"])
        check_policy(nonfinite_loss)
        if eval_every_n_steps is not None and eval_every_n_steps < 1:
            raise ValueError(f"model.eval_every_n_steps={eval_every_n_steps}; use a positive integer or null")
        self._curve_step = -1
        check_attn_implementation(attn_implementation)
        if dtype not in _DTYPES:
            raise ValueError(f"model.dtype={dtype!r}; use one of {sorted(_DTYPES)}")
        self.family = get_family(family, family_options)
        self.recipe = recipe if recipe is not None else Full()
        self.strategies = list(strategies or [])
        self.processor = (
            self.family.load_processor(pretrained) if pretrained else self.family.tiny_processor(tiny)
        )
        self.model = None
        self.results: StreamResults | None = None
        self.task_started = -1  # index of the last task whose start hooks ran (resume-safe)
        self.task_trained = -1  # index of the last task whose steps all ran (its end may be pending)
        self.replaying_task_end = False  # True while a resumed run redoes an interrupted task end
        self.run_config: str | None = None  # the run's config (JSON, set by the CLI), kept in checkpoints
        self.param_counts: dict[str, dict[str, int]] = {}
        self.counters = TrainingCounters()  # skipped / truncated / non-finite, checkpointed
        self._context: StrategyContext | None = None
        self._canonical: dict[str, str] | None = None  # real -> canonical name, computed on first use
        # Checkpoints leave frozen weights out (they come from the config / pretrained path), so every
        # loader, including the strategies' own (FSDP full checkpoints), must load non-strictly.
        self.strict_loading = False

    # ---- building ---------------------------------------------------------------------------
    @property
    def all_strategies(self) -> list[Strategy]:
        return [self.recipe, *self.strategies]

    @property
    def context(self) -> StrategyContext:
        """What the strategies' hooks see of this run (`mllm_cl.context`)."""
        if self._context is None:
            self._context = StrategyContext(self)
        return self._context

    def configure_model(self):
        if self.model is not None:  # idempotent: Lightning may call it more than once
            return
        hp = self.hparams
        self.model = self.build_model()
        for strategy in self.all_strategies:
            strategy.setup(self.context)
        if hp.gradient_checkpointing:
            # Non-reentrant: with reentrant checkpointing frozen embeddings cut the gradient (transformers #23170).
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.param_counts = self.count_parameters()
        shard_model(self)  # compile, then FSDP2 under ModelParallelStrategy (after freezing)
        self._print_counts()

    def build_model(self):
        """The HF model before recipes and sharding: `pretrained`'s weights, else a tiny random model.

        A subclass overrides it to build another model through the same path
        (benchmarks/gpu_fit_throughput.py: a 7B-shaped model with random weights).
        """
        hp = self.hparams
        if hp.pretrained:
            return self.family.load(
                hp.pretrained, _DTYPES[hp.dtype], hp.attn_implementation, hp.trust_remote_code
            )
        model, _ = self.family.build_tiny(hp.tiny, hp.tiny_seed)
        if hp.attn_implementation:
            model.set_attn_implementation(hp.attn_implementation)
        return model

    def canonical_names(self) -> dict[str, str]:
        """Real parameter name -> canonical ``component.name`` (see `mllm_cl.families`)."""
        if self._canonical is None:
            self._canonical = self.family.canonical_names(self.model)
        return self._canonical

    def forget_canonical_names(self) -> None:
        """The parameters changed (LoRA added adapters): names are recomputed on next use."""
        self._canonical = None

    def component_of(self, real_name: str) -> str:
        return self.canonical_names()[real_name].split(".", 1)[0]

    def count_parameters(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for name, p in self.model.named_parameters():
            for key in (self.component_of(name), "total"):
                c = counts.setdefault(key, {"trainable": 0, "total": 0})
                c["total"] += p.numel()
                c["trainable"] += p.numel() if p.requires_grad else 0
        return counts

    def _print_counts(self):
        if self.global_rank_zero():
            rows = [
                f"  {k:<10} {v['trainable']:>14,} / {v['total']:>14,}" for k, v in self.param_counts.items()
            ]
            print(f"[mllm_cl] {type(self.recipe).__name__}: trainable / total parameters\n" + "\n".join(rows))

    def global_rank_zero(self) -> bool:
        return self._trainer is None or self.trainer.is_global_zero

    # ---- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(
            self.model.named_parameters(), self.component_of, hp.lr, hp.component_lr, hp.weight_decay
        )
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = TaskSchedule(optimizer, hp.warmup_ratio, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def forward(self, batch: dict):
        return self.model(**{k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS})

    def training_step(self, batch, batch_idx):
        self.counters.note(self, batch)  # train/skipped_samples, train/truncated_samples
        if "input_ids" not in batch:
            return None  # every sample of the batch was skipped for length
        outputs = self(batch)
        loss = outputs.loss
        self.log("train/ce", loss.detach(), prog_bar=True)
        terms = 0
        for strategy in self.strategies:
            extra = strategy.loss(self.context, batch, outputs)
            if extra is not None:
                self.log(f"train/{type(strategy).__name__}", extra.detach())
                loss, terms = loss + extra, terms + 1
        loss = guard_loss(self, loss, self.hparams.nonfinite_loss)
        if loss is None:
            return None
        if terms:  # without a strategy term the total is train/ce again
            self.log("train/loss", loss.detach())
        return loss

    # ---- the stream -------------------------------------------------------------------------
    @property
    def stream(self):
        return self.trainer.datamodule

    def on_train_start(self):
        checkpointing.restore_rng(self)  # resumed: the RNG as saved, after Lightning's loader set-up
        if self.results is None:
            self.results = StreamResults(
                [t.name for t in self.stream.tasks], [h.name for h in self.stream.heldout]
            )
            self.results.domains = evaluation.eval_domains(self.stream.columns)
        self.results.name = self.run_name
        self._write_run_info()
        if not self.results.rows:
            self._evaluate_row("base")
        # Resumed from a task's "trained" checkpoint: its end (merges, evaluation) comes first.
        checkpointing.finish_interrupted_task(self.trainer, self)

    def on_train_epoch_start(self):
        task = self.current_epoch
        if self.task_started == task:
            return  # resumed inside this task: optimizer, schedule and strategies come from the checkpoint
        for opt in self.trainer.optimizers:
            reset_optimizer_state(opt)
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.start_task(self.stream.steps_for(task))
        for strategy in self.all_strategies:
            strategy.on_task_start(self.context, task)
        self.task_started = task

    def configure_callbacks(self):
        every = self.hparams.eval_every_n_steps  # in-task learning curves, scored before step checkpoints
        return [curve.CurvePoints(every)] if every else []

    def on_train_epoch_end(self):
        task = self.current_epoch
        if len(self.results.rows) > task + 1:
            return  # this task's row was already recorded before a resume
        faults.point("task_end")  # callbacks' task-end work (WiSE-FT merge) done, in memory only
        self.counters.end_task(self, task)
        for strategy in self.all_strategies:
            strategy.on_task_end(self.context, task)
            faults.point("strategy_end")
        for strategy in self.all_strategies:
            strategy.before_evaluation(self.context, task)  # e.g. WiSE-FT's merge: the row scores its result
            faults.point("strategy_end")
        self._evaluate_row(self.stream.tasks[task].name)

    def _evaluate_row(self, label: str):
        results = self.evaluate_all()
        faults.point("evaluated")
        accuracies = {name: r.value for name, r in results.items()}
        self.results.add_row(label, accuracies, {n: r.parts for n, r in results.items() if r.parts})
        row = len(self.results.rows) - 1
        error = None
        try:  # rank 0 writes; its full disk must stop every rank, not leave them waiting
            self._write_predictions(f"{row}_{label}", results)
            if self.tensorboard is not None and self.global_rank_zero():
                board.log_row(self.tensorboard, self.results, results, self.run_name)
                if row == len(self.stream.tasks):
                    board.log_final(self.tensorboard, self, self.results)
            if self.global_rank_zero():
                print(f"[mllm_cl] after {label}: " + ", ".join(f"{k}={v:.3f}" for k, v in accuracies.items()))
                if self.run_dir:
                    self.results.write(self.run_dir)
        except faults.DiskFullError as err:
            error = err
        faults.raise_on_every_rank(self._trainer, error)

    def _write_predictions(self, row: str, results: dict) -> None:
        """`predictions/<row>/<set>.jsonl` in the run directory (every rank's samples, rank 0 writes)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        for result in results.values():
            result.records = evaluation.gather_records(result.records, world)
        if self.global_rank_zero() and self.run_dir:
            evaluation.write_predictions(os.path.join(self.run_dir, "predictions", row), results)

    @property
    def tensorboard(self) -> TensorBoardLogger | None:
        """The run's TensorBoardLogger, if it has one (images, text, hparams go there)."""
        return next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)

    @property
    def run_name(self) -> str:
        """The display name shared by TensorBoard and `report`: the logger's run name."""
        return self.logger.name if self.logger is not None else type(self.recipe).__name__.lower()

    @property
    def run_dir(self) -> str | None:
        return local_log_dir(self.trainer) if self._trainer is not None else None

    def _write_run_info(self):
        if self.global_rank_zero() and self.run_dir:
            atomic_write(
                os.path.join(self.run_dir, "parameters.json"), json.dumps(self.param_counts, indent=2)
            )
            if self.tensorboard is not None:
                board.log_start(self.tensorboard, self.results, self.param_counts)

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, batch: dict, max_new_tokens: int | None = None, stop: list[str] | None = None
    ) -> list[str]:
        """Greedy answers for a left-padded batch of prompts (same as one at a time: mllm_cl.generation)."""
        return generation.generate(
            self.model,
            self.processor.tokenizer,
            self.family.end_of_turn,
            batch,
            max_new_tokens or self.hparams.max_new_tokens,
            stop,
            synced_gpus=self.trainer.world_size > 1 if self._trainer is not None else False,
        )

    def evaluate_all(self) -> dict[str, evaluation.ColumnResult]:
        """Score every eval set of the stream (tasks first, then held-out): {name: ColumnResult}."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size)
        return evaluation.evaluate(
            self, self.stream.columns, lambda c: self.stream.eval_loader(c, rank, world)
        )

    # validate / test subcommands: the same scorers, fed by Lightning's evaluation loop.
    def on_validation_epoch_start(self):
        self._scorers = [evaluation.ColumnScorer(c, self.device) for c in self.stream.columns]

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._scorers[dataloader_idx].add(self, batch)

    def on_validation_epoch_end(self):
        reduce_sum = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        results = {s.column.name: s.result(reduce_sum) for s in self._scorers}
        for name, result in results.items():
            self.log(f"eval/{name}", result.value, add_dataloader_idx=False)
        stage = str(getattr(self.trainer.state.fn, "value", self.trainer.state.fn))
        self._write_predictions(stage, results)
        log_dir = local_log_dir(self.trainer) if self.trainer.is_global_zero else None
        if log_dir:  # trainer.log_dir broadcasts: a rank-0-only call would hang
            evaluation.write_eval_results(self, results, log_dir)

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    # ---- checkpoint state -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["mllm_cl"] = {
            "results": self.results.to_dict() if self.results else None,
            "task_started": self.task_started,
            "task_trained": self.task_trained,
            "strategies": [s.state_dict() for s in self.all_strategies],
            "counters": self.counters.state_dict(),
        }
        checkpointing.on_save(self, checkpoint)  # drops frozen weights, adds RNG + identity

    def on_load_checkpoint(self, checkpoint):
        checkpointing.on_load(self, checkpoint)
        state = checkpoint.get("mllm_cl") or {}
        if state.get("results"):
            self.results = StreamResults.from_dict(state["results"])
        self.task_started = state.get("task_started", -1)
        checkpointing.restore_progress(self, state)  # task_trained: is a task end pending?
        self.counters.load_state_dict(state.get("counters") or state.get("length_counts"))  # or older
        for strategy, s_state in zip(self.all_strategies, state.get("strategies", []), strict=False):
            strategy.load_state_dict(s_state)
