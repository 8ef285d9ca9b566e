"""The accuracy matrix of a stream and its files in the run directory.

R[i, j] = accuracy on eval set j after training task i; row 0 is the model before any training.
Columns are the tasks (in stream order; NaN where a task has no eval set) followed by the held-out
sets. Files are written atomically (temp file + rename): an interrupted write never leaves a
truncated results file behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from mllm_cl import faults
from mllm_cl.continual import per_row_summary, summarize


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str, binary: bool = False):
    """A file to write `path` through: a temp file in the same folder, fsynced and renamed into place
    when the block ends, so a kill never leaves a truncated file and a full disk keeps the old one.

    The file gets the mode a plain `open` would give (0644 under the usual umask), not mkstemp's
    0600: result files are read by other users and by serving processes.
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=name)
    try:
        with faults.writing(path):  # a full disk: one line naming the file, the old file kept
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            faults.point(f"write.{name}", path)
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- folders (FSDP2 distributed checkpoints) ---------------------------------------------------
# A folder cannot be renamed over another, so a finished folder replaces the old one in two renames:
# the old one aside, the new one in. `recover_folder` finishes or undoes a swap cut between them.
def folder_names(path: str) -> tuple[str, str]:
    """(partial, aside): hidden siblings of `path` for the folder being written and the old one."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.partial"), os.path.join(folder, f".{name}.aside")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def swap_in_folder(path: str) -> None:
    """Put the finished `folder_names(path)[0]` in place of `path` (a folder or file, if any)."""
    partial, aside = folder_names(path)
    _remove(aside)
    if os.path.lexists(path):
        os.rename(path, aside)
    faults.point(f"swap.{os.path.basename(path)}", path)
    os.rename(partial, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    _remove(aside)


def recover_folder(path: str) -> None:
    """After a kill: a swap cut between its renames is finished (its new folder was complete before
    the first rename); a write that never reached the swap is discarded, keeping `path` as it was."""
    partial, aside = folder_names(path)
    if not os.path.lexists(path) and os.path.isdir(partial) and os.path.lexists(aside):
        os.rename(partial, path)
    _remove(partial)
    if os.path.lexists(path):
        _remove(aside)
    elif os.path.lexists(aside):
        os.rename(aside, path)


def recover_folders(folder: str) -> None:
    """`recover_folder` for every interrupted folder write in `folder`."""
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        for suffix in (".partial", ".aside"):
            if entry.startswith(".") and entry.endswith(suffix):
                recover_folder(os.path.join(folder, entry[1 : -len(suffix)]))


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(text)


@dataclass
class StreamResults:
    """Rows of the accuracy matrix as the stream proceeds."""

    tasks: list[str]
    heldout: list[str]
    rows: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    domains: dict = field(default_factory=dict)  # {column: {"image": "id"|"ood", "text": ...}} (2x2 report)
    name: str = ""  # the run's display name (its TensorBoard run name), used by `report`
    parts: list[dict] = field(default_factory=list)  # per row: {column: the metric's parts}, e.g. unmatched

    @property
    def columns(self) -> list[str]:
        return self.tasks + self.heldout

    def add_row(self, label: str, accuracies: dict[str, float], parts: dict | None = None) -> None:
        self.rows.append([float(accuracies.get(c, math.nan)) for c in self.columns])
        self.labels.append(label)
        self.parts.append(dict(parts or {}))

    def summary(self) -> dict[str, float]:
        return summarize(self.rows, len(self.tasks)) if self.rows else {}

    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "heldout": self.heldout,
            "columns": self.columns,
            "row_labels": self.labels,
            "matrix": self.rows,
            "summary": self.summary(),
            "per_row": per_row_summary(self.rows, len(self.tasks)) if self.rows else [],
            **({"domains": self.domains} if self.domains else {}),
            **({"name": self.name} if self.name else {}),
            **({"parts": self.parts} if any(self.parts) else {}),
        }

    @classmethod
    def from_dict(cls, state: dict) -> StreamResults:
        return cls(
            list(state["tasks"]),
            list(state["heldout"]),
            [list(r) for r in state["matrix"]],
            list(state["row_labels"]),
            dict(state.get("domains") or {}),
            str(state.get("name") or ""),
            [dict(p) for p in state.get("parts") or [{} for _ in state["matrix"]]],
        )

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["after", *self.columns])
        for label, row in zip(self.labels, self.rows, strict=True):
            writer.writerow([label, *(f"{v:.4f}" for v in row)])
        return buf.getvalue()

    def write(self, folder: str) -> None:
        """accuracy_matrix.csv and results.json in `folder` (NaN written as null in JSON)."""
        atomic_write(os.path.join(folder, "accuracy_matrix.csv"), self.to_csv())
        atomic_write(os.path.join(folder, "results.json"), json.dumps(nan_to_none(self.to_dict()), indent=2))


def method_name(model: dict) -> str:
    """A run's display name from its `model` config: the recipe, then each strategy, lower case, with
    WiSE-FT's α: ``saproj``, ``saproj+lwf``, ``full+wiseft0.5``."""

    def short(spec) -> str:
        path = spec.get("class_path", "") if isinstance(spec, dict) else str(spec or "")
        return path.rsplit(".", 1)[-1].lower()

    parts = [short(model.get("recipe")) or "full"]
    for spec in model.get("strategies") or []:
        name = short(spec)
        alpha = (spec.get("init_args") or {}).get("alpha") if isinstance(spec, dict) else None
        parts.append(f"{name}{alpha:g}" if isinstance(alpha, (int, float)) else name)
    return "+".join(parts)


def nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    return obj


def load_results(path: str) -> StreamResults:
    """Read a run's results.json (a run directory or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path, encoding="utf-8") as fh:
        state = json.load(fh)
    state["matrix"] = [[math.nan if v is None else v for v in row] for row in state["matrix"]]
    return StreamResults.from_dict(state)
