"""What every table of samples shares: conversation parsing, image access and tokens-only views.

A *table* is an indexable sequence of samples (see `mllm_cl.data.sources`). Tokenising a sample
needs its text and, for Qwen2.5-VL, the size of each image, never its pixels. A table may therefore
offer ``tokens_view(i)``: sample i with each image an `ImageRef` (nothing decoded; the size read
from the file header only when asked). `tokens_view(table, i)` falls back to ``table[i]``.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence

from PIL import Image

from mllm_cl.data.store import digest
from mllm_cl.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def conversation_to_messages(turns: list, where: str) -> list[dict]:
    """LLaVA `conversations` ([{"from": "human", "value": ...}, ...]) -> chat messages.

    Runs once per record when a 665k-record file is converted, hence the plain loop."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    messages, answered = [], False
    for turn in turns:
        role = None
        if isinstance(turn, dict):
            who = turn["from"] if "from" in turn else turn.get("role", "")
            # Exact first ("human" / "gpt" as LLaVA writes them), then any casing.
            role = ROLES.get(who if type(who) is str else "") or ROLES.get(str(who).lower())
        if role is None:
            raise DataError(f"{where}: each turn needs 'from' (human/gpt) and 'value'; got {str(turn)[:80]}")
        value = turn["value"] if "value" in turn else turn.get("content", "")
        content = value if type(value) is str else str(value)
        messages.append({"role": role, "content": content})
        answered = answered or (role == "assistant" and not content.isspace() and content != "")
    if not answered:
        raise DataError(f"{where}: conversation has no answer (no non-empty 'gpt' turn); add one or drop it")
    return messages


def last_answer(messages: list[dict]) -> str:
    """The default evaluation reference: the last assistant turn."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")


def open_image(path: str, where: str) -> Image.Image:
    """Decode an image file to RGB; an unreadable file is a one-line error naming it and the record."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"{where}: image {path} cannot be read ({err}); replace the file or drop the sample"
        ) from err


class ImageRef:
    """An image that is not decoded: a file path or encoded bytes, and `size` read from the header.

    Stands in for a PIL image where only the token count matters: `size` is (width, height), like
    PIL's, and costs one header read the first time (LLaVA-1.5 never asks: its count is fixed).
    """

    def __init__(self, path: str | None = None, data: bytes | None = None, where: str = ""):
        self.path, self.data, self.where = path, data, where

    @functools.cached_property
    def size(self) -> tuple[int, int]:
        try:
            with Image.open(self.path if self.data is None else io.BytesIO(self.data)) as img:
                return img.size
        except (OSError, SyntaxError, ValueError) as err:
            name = self.path or "embedded image"
            raise DataError(
                f"{self.where}: image {name} cannot be read ({err}); replace the file or drop the sample"
            ) from err


def tokens_view(table, i: int) -> dict:
    """Sample i as tokenisation needs it: images as `ImageRef` when the table can (else decoded)."""
    view = getattr(table, "tokens_view", None)
    return view(i) if view is not None else table[i]


def image_ref(folder: str, name: str, where: str) -> ImageRef:
    return ImageRef(os.path.join(folder, name), where=where)


class Subset(Sequence):
    """The samples `indices` of `table`, in that order (e.g. what a data-hybrid task draws).

    Its fingerprint names the parent's and the indices, so the processed-data cache keeps exactly
    these samples under their own key.
    """

    def __init__(self, table, indices: list[int]):
        self.table, self.indices = table, list(indices)
        inner = getattr(table, "fingerprint", None)
        self.fingerprint = None if inner is None else digest("subset", inner, self.indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return self.table[self.indices[k]]

    def tokens_view(self, k: int) -> dict:
        return tokens_view(self.table, self.indices[k])
