"""Command line: LightningCLI (fit / validate / test) plus our own subcommands.

``python -m mllm_cl fit --config configs/llava_saproj.yaml`` trains the whole task stream;
``--print_config`` shows every option; ``--help`` is generated from the classes' docstrings.
Importing `strategies` here is what lets YAML name strategy classes by short name.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402
from jsonargparse import ArgumentError, namespace_to_dict  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

import mllm_cl.data.benchmarks  # noqa: E402,F401  (sources nameable by short class name in YAML,
import strategies  # noqa: E402,F401  as strategy classes are: `class_path: Benchmark`, `class_path: SAProj`)
from mllm_cl import rundir  # noqa: E402
from mllm_cl.checkpointing import TaskCheckpoint, check_ckpt_file  # noqa: E402
from mllm_cl.cli_errors import argument_line, one_line, user_error  # noqa: E402
from mllm_cl.data.stream import TaskStream  # noqa: E402
from mllm_cl.module import MLLMModule  # noqa: E402
from mllm_cl.results import method_name  # noqa: E402
from mllm_cl.sharding import local_log_dir  # noqa: E402

DEFAULT_RUN_NAME = (
    "mllm_cl"  # replaced by the method's name (e.g. saproj+lwf) unless the config names the run
)


class MllmCLI(LightningCLI):
    """LightningCLI with the toolkit's defaults: TensorBoard logs under runs/, one row per task.

    ``--ckpt_path last`` continues the newest run directory holding a checkpoint and stops with one
    line when there is none (``last_or_new`` starts a new run then); a resume whose config trains
    something else is refused unless ``--force-resume`` (see `mllm_cl.rundir`).
    """

    config_json: str | None = None
    run_dir: rundir.RunDir | None = None

    def add_arguments_to_parser(self, parser):
        parser.add_argument(
            "--force-resume",
            action="store_true",
            help="resume --ckpt_path even when the config differs from the run's (the differing keys are printed)",
        )
        # `checkpoint.*`: last.ckpt at every task end (and every_n_train_steps) for `--ckpt_path last`.
        parser.add_lightning_class_args(TaskCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": DEFAULT_RUN_NAME},
                },
                "trainer.num_sanity_val_steps": 0,
                "trainer.log_every_n_steps": 10,
                # The stream sets max_epochs to its task count in setup; -1 only avoids Lightning's
                # "max_epochs was not set, using 1000" notice, which does not apply here.
                "trainer.max_epochs": -1,
                # Our own trainable/total table per component replaces Lightning's module summary.
                "trainer.enable_model_summary": False,
            }
        )

    def init_parser(self, **kwargs):
        # Raise instead of printing usage + a multi-line message; `main` prints it as one line.
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False
        return parser

    def _parse_ckpt_path(self):
        """Resolve ``last``, refuse a bad file or (fit) another config in one line, before anything loads."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        self._name_run(section)  # before `last` is looked up: under the run's name, not the default
        path = rundir.resolve_ckpt_path(section, subcommand)
        checkpoint = check_ckpt_file(path)
        if subcommand != "fit":
            super()._parse_ckpt_path()  # validate / test: the model's hyperparameters from the checkpoint
            return
        plain = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        current = rundir.run_config(plain[subcommand])
        self.config_json = json.dumps(current, sort_keys=True)
        if path:
            rundir.check_same_config(checkpoint, current, path, bool(section.get("force_resume")))
        section["force_resume"] = False  # a one-off: not carried into the run's saved config.yaml
        # No merge of the checkpoint's hyperparameters into the config (Lightning's default): the
        # config was just checked against the run's, and with --force-resume the new one applies.

    def instantiate_trainer(self, **kwargs):
        if self.config.get("subcommand") in ("validate", "test"):
            # They write into the scored run's directory: keep that run's config.yaml.
            self.save_config_kwargs = {
                **self.save_config_kwargs,
                "config_filename": f"config_{self.subcommand}.yaml",
            }
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self):
        self._name_run(self.config.get(self.subcommand) if self.subcommand else self.config)

    @staticmethod
    def _name_run(config) -> None:
        """A TensorBoard run not named by the user is named by its method (e.g. saproj+lwf)."""
        logger = config.get("trainer", {}).get("logger") if config else None
        if hasattr(logger, "get") and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
            args = logger["init_args"]
            args["default_hp_metric"] = False  # the hparams get the real final measures instead
            if args.get("name") == DEFAULT_RUN_NAME:
                args["name"] = method_name(namespace_to_dict(config.get("model")) or {})

    def before_fit(self):
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # SummaryWriter kwargs (the writer is made lazily): live curves, not every 120 s.
                logger._kwargs.setdefault("flush_secs", 30)
        if not any(isinstance(cb, LearningRateMonitor) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        # Safe loading, one-line checks, the run directory's lock (mllm_cl.rundir).
        self.run_dir = rundir.RunDir(local_log_dir(self.trainer))
        rundir.prepare_fit(self.trainer, self.model, self.config_init["fit"], self.config_json, self.run_dir)

    def before_validate(self):
        self.run_dir = rundir.RunDir(local_log_dir(self.trainer))

    before_test = before_validate

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except Exception:
            if self.run_dir is not None:
                self.run_dir.remove_if_empty()  # a failed command leaves no empty version folder
            raise
        finally:
            if self.run_dir is not None:
                self.run_dir.release()


# One registry: every subcommand, where it lives and its one-line help. Lightning's subcommands run
# through `MllmCLI`; the others are imported by name only when called, so `report` and `plan` start
# without loading models, and no library module needs to import this one.
COMMANDS: dict[str, tuple[str | None, str]] = {
    "fit": (None, "train the whole task stream; writes the accuracy matrix, checkpoints, TensorBoard logs"),
    "validate": (None, "score a checkpoint (or the config's model) on every eval set"),
    "test": (None, "same as validate, through Lightning's test loop"),
    "plan": (
        "mllm_cl.plan:main",
        "memory per GPU term by term, optimizer steps and evaluations of a run, before you launch",
    ),
    "report": ("mllm_cl.report:main", "compare runs: tables, continual-learning measures, plots, report.md"),
    "export": ("mllm_cl.commands:export_main", "write a trained run as a Hugging Face checkpoint"),
    "cache": ("mllm_cl.commands:cache_main", "pre-build the processed-data caches of a fit config"),
    "probe": ("mllm_cl.probe_command:main", "counting-bias probe (number-token mass) over saved checkpoints"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        "usage: python -m mllm_cl <command> [options]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`python -m mllm_cl <command> --help` lists a command's options."
    )


# Notices a user cannot act on: each is a consequence of the stream design or of a library's internals.
_NOTICES = (
    # One Lightning epoch is one task, so a short task has fewer batches than log_every_n_steps; logging
    # still happens every N optimizer steps across tasks.
    r"The number of training batches .* is smaller than the logging interval",
    # During fit the stream evaluates itself (generation at task ends), so the val loader list is empty.
    r"Total length of `.*` across ranks is zero",
    # Lightning 2.6 internals under torch >= 2.10.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()  # an advert printed on every run


def quiet_known_notices() -> None:
    for pattern in _NOTICES:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTip())


def _command(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m mllm_cl`` and ``mllm-cl``: one error policy for every subcommand.

    A `MllmClError` (also when a library re-raised it as another exception, as jsonargparse does
    for errors in `__init__`), a full disk, or a config-parsing error prints one ``error: ...`` line
    and exits 2.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    target = COMMANDS.get(argv[0], (None, ""))[0]
    try:
        if target is not None:
            sys.exit(_command(target)(argv[1:]))
        quiet_known_notices()
        # args=None when argv is the real command line: LightningCLI warns when given both.
        cli_args = None if args is None else argv
        MllmCLI(MLLMModule, TaskStream, args=cli_args, save_config_kwargs={"overwrite": True})
    except ArgumentError as err:
        print(f"error: {argument_line(err)}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        inner = user_error(err)
        if inner is None:
            raise
        print(f"error: {one_line(inner)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
