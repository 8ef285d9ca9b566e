"""On-disk Arrow cache entries: built once into a temp folder, renamed into place, memory-mapped.

An entry is a folder holding the Arrow files `datasets` wrote and a manifest listing them with
their byte sizes and the row count. Opening an entry checks the manifest against the files and
lets pyarrow read every file's batch layout, so a truncated or half-deleted entry (a full disk,
a killed job, a copy that did not finish) is detected, reported and rebuilt instead of failing
deep inside a training step. A file lock next to the entry makes concurrent processes (ranks,
nodes on a shared file system) build it once: the others wait, then open the same files, whose
pages the OS shares between every process that maps them (ranks and dataloader workers alike).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from mllm_cl.errors import MllmClError

MANIFEST = "mllm_cl_entry.json"


def cache_root() -> Path:
    """`$MLLM_CL_CACHE`, else ~/.cache/mllm_cl (synthetic data and processed data live here)."""
    return Path(os.environ.get("MLLM_CL_CACHE") or Path.home() / ".cache" / "mllm_cl")


def digest(*parts) -> str:
    """Short stable hash of JSON-able parts (cache keys and table fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class DamagedEntry(Exception):
    """A cache entry whose files do not match its manifest (or cannot be read)."""


def open_entry(folder: Path):
    """The entry's rows as one memory-mapped `datasets.Dataset`; DamagedEntry when it is not intact."""
    import datasets  # noqa: PLC0415  (heavy import, only when caching)

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = [(folder / name, size) for name, size in manifest["files"]]
        rows = int(manifest["rows"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedEntry(f"no readable manifest ({err})") from err
    for path, size in files:
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise DamagedEntry(f"{path.name} has {actual} bytes, {size} written")
    try:
        parts = [datasets.Dataset.from_file(str(path)) for path, _ in files]
    except Exception as err:  # noqa: BLE001  (pyarrow raises several types for a damaged stream)
        raise DamagedEntry(f"unreadable Arrow file ({str(err).splitlines()[0]})") from err
    if not parts:
        raise DamagedEntry("no Arrow files")
    table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(table) != rows:
        raise DamagedEntry(f"{len(table)} rows, {rows} written")
    return table


def warn_rank_zero(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_warn  # noqa: PLC0415

    rank_zero_warn(message)


def cached_entry(
    folder: Path, build: Callable[[Path], object], what: str, warn=warn_rank_zero, lock: bool = True
):
    """Open the entry at `folder`; build it first when missing, rebuild it (saying so) when damaged.

    `build(tmp)` returns a `datasets.Dataset` whose Arrow files it wrote under the folder `tmp`.
    `lock`: take a file lock beside the entry while building (callers that already let one process
    build, like the processed-data cache's local rank 0, pass False and leave no lock file).
    """
    from filelock import FileLock  # noqa: PLC0415  (a dependency of datasets)

    if folder.is_dir():
        try:
            return open_entry(folder)
        except DamagedEntry as err:
            warn(f"{what}: cache entry {folder} is damaged ({err}); rebuilding it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock") if lock else contextlib.nullcontext():
        if folder.is_dir():  # built by another process while we waited, or still the damaged one
            try:
                return open_entry(folder)
            except DamagedEntry:
                shutil.rmtree(folder)
        _build_into(folder, build)
    return open_entry(folder)


def _build_into(folder: Path, build: Callable[[Path], object]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        table = build(tmp)
        files = [Path(f["filename"]).resolve() for f in table.cache_files]
        names = [str(f.relative_to(tmp.resolve())) for f in files]  # outside tmp: a build bug, fails here
        sizes = [[name, f.stat().st_size] for name, f in zip(names, files, strict=True)]
        (tmp / MANIFEST).write_text(json.dumps({"files": sizes, "rows": len(table)}))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent builder (another node) that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_batches(rows: Iterator[dict], features, path: Path, batch_size: int = 10_000):
    """Stream `rows` into one Arrow file in batches of `batch_size`, straight through pyarrow (no
    per-row feature encoding: for plain columns, such as a file's record texts, that encoding is
    most of `from_generator`'s time); the memory-mapped `datasets.Dataset` of the file."""
    import datasets  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    schema, names = features.arrow_schema, list(features)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        columns = {name: [] for name in names}
        for row in rows:
            for name in names:
                columns[name].append(row[name])
            if len(columns[names[0]]) >= batch_size:
                writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=schema))
                columns = {name: [] for name in names}
        if columns[names[0]]:
            writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=schema))
    return datasets.Dataset.from_file(str(path))


def write_rows(rows: Iterator[dict], features, tmp: Path, fingerprint: str):
    """Stream `rows` into Arrow files under `tmp` in batches (`Dataset.from_generator`): memory stays
    flat however many rows come. A one-line error raised by the generator comes out as itself."""
    import datasets  # noqa: PLC0415

    first = next(rows, None)
    if first is None:  # from_generator refuses an empty split; an empty Arrow stream is a valid entry
        tmp.mkdir(parents=True, exist_ok=True)
        path = tmp / "empty.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, features.arrow_schema):
            pass
        return datasets.Dataset.from_file(str(path))

    def generate():
        yield first
        yield from rows

    quiet = not datasets.utils.are_progress_bars_disabled()  # the caller shows its own bar
    if quiet:
        datasets.disable_progress_bars()
    try:
        return datasets.Dataset.from_generator(
            generate, features=features, cache_dir=str(tmp), fingerprint=fingerprint
        )
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, MllmClError):
            raise err.__cause__ from None
        raise
    finally:
        if quiet:
            datasets.enable_progress_bars()
