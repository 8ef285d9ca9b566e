"""LLaVA conversation JSON / JSONL, converted once into a memory-mapped Arrow table.

LLaVA-665k is 665,000 records (700 MB of JSON). Parsing it into Python objects in every process
costs seconds and gigabytes per rank, and forked dataloader workers slowly un-share those pages
(refcount writes). Instead the file is converted once:

1. the main process streams the file and splits it into record texts (a JSON list is cut with
   `json.JSONDecoder.raw_decode` over a sliding buffer, never `json.loads` of the whole file),
   written to a temporary Arrow file in batches;
2. `datasets.map` with `num_proc` workers parses and checks every record (conversation shape, the
   images exist) and writes the normalised columns; the first bad record stops the conversion
   with one line naming the file and the record (``file record i`` / ``file:line``);
3. the result is kept under ``$MLLM_CL_CACHE/llava/<key>`` (key: the file's path, size, mtime and
   inode, the image folder, `limit`), memory-mapped by every rank and worker, which share its
   pages. A damaged entry is rebuilt (see `mllm_cl.data.store`).

Each record becomes the samples the earlier in-memory loader gave: ``answers`` defaults to the
last assistant turn, ``id`` to the record's position. Two deliberate differences: answers are kept
as strings (Arrow needs one type; a bare string is one answer, not a list of its characters), and
JSONL is split on line ends only (a U+2028 inside a string no longer breaks a record).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from mllm_cl.data.store import cache_root, cached_entry, digest, write_batches, write_rows
from mllm_cl.data.tables import ImageRef, conversation_to_messages, last_answer, open_image
from mllm_cl.errors import DataError

FORMAT_VERSION = 1  # bump when the columns or the checks change
_CHUNK = 1 << 24  # characters read at a time from a JSON list
_TAIL = 16  # an error this close to the buffer's end may be the cut (e.g. inside a \uXXXX escape)
_SPACE = re.compile(r"\s*")
_PARALLEL_FROM = 20_000  # records: below this a worker pool costs more than it saves


def _features(raw: bool):
    import datasets  # noqa: PLC0415

    text = datasets.Value("string")
    if raw:
        return datasets.Features({"line": datasets.Value("int64"), "raw": text})
    return datasets.Features({
        "id": text, "images": datasets.List(text), "answers": datasets.List(text),
        "messages": datasets.List({"role": text, "content": text}), "line": datasets.Value("int64"),
        "error": text,
    })  # fmt: skip


def jsonl_records(path: str, limit: int | None) -> Iterator[dict]:
    """{"line": line number, "raw": text} per non-empty line."""
    count = 0
    with open(path, encoding="utf-8", newline=None) as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and count >= limit:
                return
            if line.strip():
                count += 1
                yield {"line": lineno, "raw": line}


def json_list_records(path: str, limit: int | None) -> Iterator[dict]:
    """{"line": record index, "raw": text} per element of a JSON list, reading the file in chunks."""
    with open(path, encoding="utf-8") as fh:
        yield from _ListReader(path, fh).records(limit)


class _ListReader:
    """Cuts a JSON list into element texts over a sliding buffer of about one chunk."""

    def __init__(self, path: str, fh):
        self.path, self.fh, self.decoder = path, fh, json.JSONDecoder()
        self.buf, self.pos, self.dropped, self.lines = fh.read(_CHUNK), 0, 0, 0  # chars / lines before buf

    def _read_on(self) -> bool:
        """Append the next chunk, dropping what is consumed; False at the end of the file."""
        more = self.fh.read(_CHUNK)
        if more:
            self.lines += self.buf.count("\n", 0, self.pos)
            self.dropped += self.pos
            self.buf, self.pos = self.buf[self.pos :] + more, 0
        return bool(more)

    def _space(self) -> str:
        """Skip white space; the next character ("" at the end of the file)."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self._read_on():
                return self.buf[self.pos : self.pos + 1]

    def _malformed(self, msg: str, at: int) -> DataError:
        line = self.lines + self.buf.count("\n", 0, at) + 1
        return DataError(f"{self.path}:{line}: malformed JSON ({msg}); fix the file")

    def _element(self) -> int:
        """End of the element at `pos`. An error at the buffer's end (or an unterminated string) may
        only mean the element runs past the buffer: read on and retry; any other error is real."""
        while True:
            try:
                return self.decoder.raw_decode(self.buf, self.pos)[1]
            except json.JSONDecodeError as err:
                cut = err.msg.startswith("Unterminated") or err.pos >= len(self.buf) - _TAIL
                if not cut or not self._read_on():
                    raise self._malformed(err.msg, err.pos) from err

    def records(self, limit: int | None) -> Iterator[dict]:
        if self._space() != "[":
            raise DataError(f"{self.path}: expected a JSON list of records (or a .jsonl file)")
        self.pos += 1
        index = 0
        while limit is None or index < limit:
            if self._space() == "]":
                self.pos += 1
                if self._space():
                    raise self._malformed("Extra data", self.pos)
                return
            if index:
                if self.buf[self.pos : self.pos + 1] != ",":
                    raise self._malformed("Expecting ',' delimiter", self.pos)
                self.pos += 1
                self._space()
            end = self._element()
            yield {"line": index, "raw": self.buf[self.pos : end]}
            index, self.pos = index + 1, end
            if self.pos > _CHUNK:  # keep the buffer near one chunk
                self.lines += self.buf.count("\n", 0, self.pos)
                self.dropped += self.pos
                self.buf, self.pos = self.buf[self.pos :], 0


def check_batch(batch: dict, path: str, image_folder: str, jsonl: bool) -> dict:
    """Parse and check record texts (one `datasets.map` batch) into the table's columns; a bad record
    gets its one-line message in "error" (raising inside a worker pool would lose the line)."""
    out = {name: [] for name in ("id", "images", "answers", "messages", "line", "error")}
    for line, raw in zip(batch["line"], batch["raw"], strict=True):
        where = f"{path}:{line}" if jsonl else f"{path} record {line}"
        try:
            row = _check(raw, where, image_folder, jsonl)
        except DataError as err:
            row = {"id": "", "images": [], "answers": [], "messages": [], "error": str(err)}
        for key, value in row.items():
            out[key].append(value)
        out["line"].append(line)
    return out


def _check(raw: str, where: str, image_folder: str, jsonl: bool) -> dict:
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as err:  # only JSONL gets here: a list was split by a full parse
        raise DataError(f"{where}: malformed JSON ({err.msg}); fix or delete the line") from err
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object")
    messages = conversation_to_messages(rec.get("conversations"), where)
    files = rec.get("image") or []
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise DataError(f"{where}: 'image' must be a path or a list of paths; got {str(files)[:80]}")
    for name in files:
        full = os.path.join(image_folder, name)
        if not os.path.isfile(full):
            raise DataError(f"{where}: image {full} not found; fix image_folder or the record's 'image'")
    answers = rec.get("answers") or [last_answer(messages)]
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list):
        raise DataError(f"{where}: 'answers' must be a list of reference answers")
    return {"id": None if "id" not in rec else str(rec["id"]), "images": files, "messages": messages,
            "answers": [str(a) for a in answers], "error": None}  # fmt: skip


def convert(path: str, image_folder: str, limit: int | None, tmp: Path, num_proc: int | None):
    """The checked table of `path`, written under `tmp` (see the module docstring)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    jsonl, name = path.endswith(".jsonl"), os.path.basename(path)
    records = (jsonl_records if jsonl else json_list_records)(path, limit)
    with tqdm(records, unit=" records", desc=f"reading {name}", mininterval=1.0) as bar:
        raw = write_batches(bar, _features(raw=True), tmp / "raw" / "records.arrow")
    if len(raw) == 0:
        return write_rows(iter([]), _features(raw=False), tmp, "")
    procs = num_proc or (min(8, os.cpu_count() or 1) if len(raw) >= _PARALLEL_FROM else 1)
    table = raw.map(
        check_batch, batched=True, batch_size=1000, writer_batch_size=1000, num_proc=procs if procs > 1 else None,
        fn_kwargs={"path": path, "image_folder": image_folder, "jsonl": jsonl}, features=_features(raw=False),
        remove_columns=raw.column_names, cache_file_name=str(tmp / "records.arrow"),
        new_fingerprint=digest("checked", path, limit), desc=f"checking {name}",
    )  # fmt: skip
    del raw
    shutil.rmtree(tmp / "raw")  # the record texts: not part of the entry
    _raise_first_error(table)
    return table


def _raise_first_error(table) -> None:
    import pyarrow.compute as pc  # noqa: PLC0415

    errors = table.data.column("error")
    if errors.null_count < len(errors):
        first = pc.index(pc.is_valid(errors), True).as_py()
        raise DataError(errors[first].as_py())


class LlavaTable(Sequence):
    """The converted records of a LLaVA file: samples decoded on access, from memory-mapped Arrow."""

    def __init__(self, rows, path: str, image_folder: str):
        self.rows, self.path, self.image_folder = rows, path, image_folder
        self.jsonl = path.endswith(".jsonl")

    def __len__(self):
        return len(self.rows)

    def _row(self, i: int) -> tuple[dict, str]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = self.rows[i]
        where = f"{self.path}:{row['line']}" if self.jsonl else f"{self.path} record {row['line']}"
        return row, where

    def _sample(self, row: dict, i: int, images: list) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        sample_id = row["id"] if row["id"] is not None else str(i % len(self))
        return {"id": sample_id, "images": images, "messages": messages, "answers": row["answers"]}

    def __getitem__(self, i):
        row, where = self._row(i)
        images = [open_image(os.path.join(self.image_folder, f), where) for f in row["images"]]
        return self._sample(row, i, images)

    def tokens_view(self, i: int) -> dict:
        row, where = self._row(i)
        return self._sample(
            row, i, [ImageRef(os.path.join(self.image_folder, f), where=where) for f in row["images"]]
        )


def load_llava(
    path: str, image_folder: str, limit: int | None, num_proc: int | None, cache_dir: str | None
) -> LlavaTable:
    """The Arrow table of a LLaVA file: converted on first use, then memory-mapped from the cache."""
    stat = os.stat(path)
    key = digest("llava", FORMAT_VERSION, os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino,
                 os.path.abspath(image_folder), limit)  # fmt: skip
    folder = (Path(cache_dir) if cache_dir else cache_root()) / "llava" / f"{Path(path).stem}-{key}"
    rows = cached_entry(folder, lambda tmp: convert(path, image_folder, limit, tmp, num_proc), path)
    return LlavaTable(rows.remove_columns("error"), path, image_folder)
