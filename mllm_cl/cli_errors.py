"""Errors reduced to the one line a user needs: the CLI layer's error policy (`mllm_cl.cli`, `plan`).

A `MllmClError` (config, data, disk full) is shown as its message; jsonargparse's multi-line
errors become the key, and for a mistyped class or argument the near matches and the valid names.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

import lightning.pytorch as pl

import strategies
from mllm_cl.data.sources import Source
from mllm_cl.errors import MllmClError
from mllm_cl.faults import DiskFullError, is_disk_full

# "Caught DataError in DataLoader worker process 0. Original Traceback ...": PyTorch re-raises
# a worker's exception in the main process with the whole worker traceback as its message.
_QUALIFIED = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception): ")


def one_line(err: BaseException) -> str:
    """The user-facing line of `err` (the original message when it came from a worker)."""
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if len(lines) == 1:
        return lines[0]
    return _QUALIFIED.sub("", lines[-1].strip(), count=1)


def user_error(err: BaseException) -> BaseException | None:
    """The `MllmClError` behind `err` (jsonargparse re-raises an `__init__`'s ConfigError as a
    ValueError), or a full-disk `OSError`; None when `err` is a bug to show with its traceback."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MllmClError):
            return err
        if is_disk_full(err):
            where = getattr(err, "filename", None) or "the run directory"
            return DiskFullError(f"disk full while writing {where} ({err}); free some space, then "
                                 "continue with --ckpt_path last")  # fmt: skip
        err = err.__cause__ or err.__context__
    return None


def argument_line(err: BaseException) -> str:
    """A jsonargparse error as one line: the key, and for a mistyped class or init argument the
    near matches (difflib) and the valid names."""
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    keys = re.findall(r'Parser key "([^"]+)"', text)
    key = ".".join(keys) or lines[0].rstrip(":")
    unknown_arg = re.search(
        r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", text
    )
    unknown_class = re.search(r"(?:Expected a dot import path string:|Import path)\s*'?([\w.]+)'?", text)
    hint = "see --help or --print_config for valid keys and values"
    if unknown_arg:
        return _unknown_arg(key, *unknown_arg.groups(), hint)
    if unknown_class:
        return _unknown_class(key, unknown_class.group(1), hint)
    line = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')} {lines[-1]}"
    return f"{line} ({hint})"


def _unknown_arg(key: str, class_path: str, name: str, hint: str) -> str:
    module, _, cls_name = class_path.rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module), cls_name).__init__).parameters
        valid = [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                              inspect.Parameter.VAR_KEYWORD)]  # fmt: skip
    except (ImportError, AttributeError, ValueError, TypeError):
        valid = []
    near = difflib.get_close_matches(name, valid, n=3)
    guess = f"; did you mean {' or '.join(near)}?" if near else ""
    return f"{key}: {cls_name} has no argument '{name}'{guess} Valid: {', '.join(valid) or '?'} ({hint})"


def _unknown_class(key: str, name: str, hint: str) -> str:
    names = sorted(_known_classes())
    near = difflib.get_close_matches(name.rpartition(".")[2], names, n=3, cutoff=0.6)
    guess = f"; did you mean {' or '.join(near)}?" if near else "; give a class name or a full import path"
    return f"{key}: unknown class '{name}'{guess} ({hint})"


def _known_classes() -> set[str]:
    """Short names of the classes a config can name: recipes, strategies, sources, callbacks, loggers."""
    bases = [strategies.Strategy, Source, pl.Callback, pl.loggers.Logger]
    found, todo = set(), list(bases)
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return {n for n in found if not n.startswith("_")}
