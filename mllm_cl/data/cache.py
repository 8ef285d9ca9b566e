"""Processed-data cache (`data.cache_processed`): tokenised training samples kept with `datasets`.

A second run over the same data skips tokenisation and label alignment: it reads each sample's token
ids and answer labels (training) or prompt ids (eval sets) from a memory-mapped Arrow table. Per sample we store the ids and labels with
every run of image tokens collapsed to one position, plus the run lengths (a 576-token LLaVA image
costs one integer), and whether the sample was skipped or truncated for length. Images are still
decoded and run through the image processor in the dataloader workers: pixel tensors would be far
larger on disk than the images themselves.

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
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from mllm_cl.errors import DataError

CACHE_VERSION = 1  # bump when the record layout or the encoding rules change


def cache_root() -> Path:
    """`$MLLM_CL_CACHE`, else ~/.cache/mllm_cl (synthetic data and processed data live here)."""
    return Path(os.environ.get("MLLM_CL_CACHE") or Path.home() / ".cache" / "mllm_cl")


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


def digest(*parts) -> str:
    """Short stable hash of JSON-able parts (cache keys and table fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


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
        try:
            return self.encoder.record(self.table[i], self.prompt)
        except DataError as err:  # re-raised in the main process as one line, not a worker traceback
            return {"error": str(err)}


def _as_is(item):
    return item


def build(table, encoder, path: Path, num_workers: int, prompt: bool = False) -> None:
    """Encode every sample of `table` once and save the records under `path` (atomically)."""
    import datasets  # noqa: PLC0415  (heavy import, only when caching)

    columns = {"ids": [], "labels": [], "image_runs": [], "skip": [], "truncated": []}
    loader = DataLoader(
        _Records(table, encoder, prompt), batch_size=None, collate_fn=_as_is, num_workers=num_workers
    )
    for record in loader:
        if "error" in record:
            raise DataError(record["error"])
        for key, values in columns.items():
            values.append(record[key])
    ints = datasets.Sequence(datasets.Value("int32"))
    flag = datasets.Value("bool")
    features = datasets.Features(
        {"ids": ints, "labels": ints, "image_runs": ints, "skip": flag, "truncated": flag}
    )
    save_atomically(datasets.Dataset.from_dict(columns, features=features), path)


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
    import datasets  # noqa: PLC0415
    from lightning.pytorch.utilities import rank_zero_info  # noqa: PLC0415

    fingerprint = getattr(table, "fingerprint", None)
    if fingerprint is None:
        rank_zero_info(f"data.cache_processed: {where} has no fingerprint; encoding it on the fly")
        return table
    path = root / f"processed-{cache_key(fingerprint, encoder, prompt)}"
    if not path.is_dir() and (trainer is None or trainer.local_rank == 0):
        build(table, encoder, path, num_workers, prompt)
        rank_zero_info(
            f"data.cache_processed: {where or 'table'}: tokenised {len(table)} samples into {path}"
        )
    if trainer is not None:
        trainer.strategy.barrier("mllm_cl_processed_cache")
    return Tokenized(table, datasets.load_from_disk(str(path)))
