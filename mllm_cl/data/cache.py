"""Processed-data cache (`data.cache_processed`): tokenised training samples kept with `datasets`.

A second run over the same data skips tokenisation and label alignment: it reads each sample's token
ids and answer labels (training) or prompt ids (eval sets) from a memory-mapped Arrow table. Per sample we store the ids and labels with
every run of image tokens collapsed to one position, plus the run lengths (a 576-token LLaVA image
costs one integer), and whether the sample was skipped or truncated for length. Training still
decodes images and runs the image processor in the dataloader workers: pixel tensors would be far
larger on disk than the images themselves. Building the cache does not: where every image has the
same token count (LLaVA-1.5) no image is opened, and where the count follows the image size
(Qwen2.5-VL) only the file headers are read (`Encoder.record`, `mllm_cl.data.tables.ImageRef`).

Building streams: the dataloader workers' records go to Arrow in batches (`Dataset.from_generator`),
so the main process's memory stays flat in the number of samples, and a bar shows samples/s. A
data-hybrid source is cached per task for the samples that task draws only (`strategies.hybrid`).
An entry left damaged (truncated, half deleted) is detected when opened and rebuilt, with a warning
(`mllm_cl.data.store`).

The cache key covers everything the tokens depend on: the table's fingerprint (size and mtime of a
LLaVA JSON file, the `datasets` fingerprint of a Hugging Face dataset), the tokenizer (its whole
serialised form), the processor's settings (Qwen2.5-VL's image token count depends on them), the
family's chat template (a rendered probe conversation), max_length and overlength. A table without
a `fingerprint` attribute (a user-written source) is encoded on the fly as before. Replacing image
files in place is not detected: delete the cache folder (or touch the annotation file) after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from mllm_cl.data.store import cache_root, cached_entry, digest, open_entry, write_rows
from mllm_cl.data.tables import tokens_view
from mllm_cl.errors import DataError

__all__ = ["cache_root", "digest", "cache_key", "build", "tokenized", "Tokenized", "save_atomically"]

CACHE_VERSION = 2  # bump when the record layout, the encoding rules or the storage change
_BATCH = 64  # samples per worker hand-over while building


def save_atomically(dataset, final: Path) -> None:
    """`save_to_disk` into a temp dir beside `final`, then rename it into place in one step."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a concurrent writer (another node's rank 0) winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_key(fingerprint: str, encoder, prompt: bool = False) -> str:
    """Hex digest of everything a cached record depends on."""
    tok, proc = encoder.processor.tokenizer, encoder.processor
    backend = getattr(tok, "backend_tokenizer", None)
    tokenizer = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    image_proc = getattr(proc, "image_processor", None)
    probe = encoder.family.render(
        [
            {"role": "user", "content": "q " + encoder.family.image_placeholder},
            {"role": "assistant", "content": "a"},
        ]
    )
    parts = {
        "version": CACHE_VERSION,
        "table": fingerprint,
        "family": type(encoder.family).__qualname__,
        "template": [probe.text, probe.targets],
        "tokenizer": hashlib.sha256(tokenizer.encode()).hexdigest(),
        "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, type(tok).__name__],
        "image_processor": image_proc.to_json_string() if image_proc is not None else None,
        "processor": {k: v for k, v in vars(proc).items() if isinstance(v, (int, float, str, bool))},
        "max_length": encoder.max_length,
        "overlength": encoder.overlength,
        "prompt": prompt,
    }
    return digest(parts)


class _Records(Dataset):
    """Encodes samples into compact records in the dataloader workers (build side)."""

    def __init__(self, table, encoder, prompt: bool):
        self.table, self.encoder, self.prompt = table, encoder, prompt

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        try:  # only tokens are cached: images are not decoded unless their token count needs the pixels
            sample = self.table[i] if self.encoder.needs_pixels else tokens_view(self.table, i)
            return self.encoder.record(sample, self.prompt)
        except DataError as err:  # re-raised in the main process as one line, not a worker traceback
            return {"error": str(err)}


def _features():
    import datasets  # noqa: PLC0415  (heavy import, only when caching)

    ints, flag = datasets.List(datasets.Value("int32")), datasets.Value("bool")
    return datasets.Features(
        {"ids": ints, "labels": ints, "image_runs": ints, "skip": flag, "truncated": flag}
    )


def _records(table, encoder, num_workers: int, prompt: bool, where: str) -> Iterator[dict]:
    """Every sample's record in order, encoded by `num_workers` workers, with a samples/s bar."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    pixels = encoder.needs_pixels  # decided once here (the processor runs on two probes); workers inherit it
    loader = DataLoader(
        _Records(table, encoder, prompt), batch_size=_BATCH, collate_fn=list, num_workers=num_workers
    )
    with tqdm(
        total=len(table),
        unit=" samples",
        desc=f"tokenising {where}" + ("" if pixels else " (text only)"),
        mininterval=1.0,
    ) as bar:
        for batch in loader:
            for record in batch:
                if "error" in record:
                    raise DataError(record["error"])
                yield record
            bar.update(len(batch))


def build(table, encoder, path: Path, num_workers: int, prompt: bool = False, where: str = "table"):
    """Encode every sample of `table` once into the cache entry `path`, streaming: records go to Arrow
    in batches as they come, so memory stays flat however large the table. Returns the records
    (memory-mapped). An existing intact entry is opened as it is; a damaged one is rebuilt."""

    def write(tmp: Path):
        rows = _records(table, encoder, num_workers, prompt, where)
        written = write_rows(rows, _features(), tmp, path.name)
        rank_zero_info(f"data.cache_processed: {where}: tokenised {len(table)} samples into {path}")
        return written

    return cached_entry(path, write, f"data.cache_processed: {where}", lock=False)


class Tokenized(Sequence):
    """A training table whose samples carry their cached tokens (`sample["_tokens"]`)."""

    def __init__(self, table, records):
        if len(records) != len(table):
            raise DataError(f"processed cache has {len(records)} records for {len(table)} samples; delete it")
        self.table, self.records = table, records

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return {**self.table[i], "_tokens": self.records[i]}


def tokenized(
    table, encoder, root: Path, trainer=None, num_workers: int = 0, where: str = "", prompt: bool = False
) -> Sequence:
    """`table` with cached tokens: built once (by local rank 0, the others wait), then read from disk.

    `prompt`: cache generation prompts (eval sets: the conversation up to the last user turn, no labels).

    Returns `table` itself when it has no fingerprint (it cannot be keyed, so it is encoded on the fly).
    """
    fingerprint = getattr(table, "fingerprint", None)
    if fingerprint is None:
        rank_zero_info(f"data.cache_processed: {where} has no fingerprint; encoding it on the fly")
        return table
    path = root / f"processed-{cache_key(fingerprint, encoder, prompt)}"
    records = None
    if trainer is None or trainer.local_rank == 0:
        records = build(table, encoder, path, num_workers, prompt, where or "table")
    if trainer is not None:
        trainer.strategy.barrier("mllm_cl_processed_cache")
    return Tokenized(table, records if records is not None else open_entry(path))
