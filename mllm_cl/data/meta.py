"""What evaluation needs to know about a sample besides its tokens: references, label set, fields.

Kept in the data layer (the eval dataloader attaches it to every prompt in its worker) so that the
data modules never import evaluation code.
"""

from __future__ import annotations

import re

_CHOOSE = re.compile(r"choose one of:\s*(.+?)\.?\s*$", re.IGNORECASE | re.DOTALL)
# EMT's label prompts: "... in [a, b, c]" / "... from [a, b]" (Zhai et al., the classification prompt).
_BRACKETS = re.compile(r"\[([^\[\]]+)\]\s*[.?]?\s*$", re.DOTALL)


def prompt_text(sample: dict) -> str:
    """The text of the last user message: the question as asked, options included."""
    users = [m["content"] for m in sample.get("messages", []) if m["role"] == "user"]
    return users[-1] if users else ""


def prompt_labels(sample: dict) -> list[str] | None:
    """A sample's label set: its `labels` field, else parsed from its last question.

    Understood forms: "Choose one of: a, b, c." and EMT's "... in [a, b, c]".
    """
    if sample.get("labels"):
        return [str(x) for x in sample["labels"]]
    text = prompt_text(sample)
    found = _CHOOSE.search(text) or _BRACKETS.search(text)
    if not found:
        return None
    labels = [x.strip().strip("'\"") for x in found.group(1).split(",")]
    return [x for x in labels if x] or None


def eval_meta(sample: dict, scored: bool) -> dict:
    """The bookkeeping an eval prompt carries to scoring (`scored` False: a padding row, never scored)."""
    meta = {
        "answers": list(sample["answers"]),
        "id": sample["id"],
        "weight": 1 if scored else 0,
        "prompt": prompt_text(sample),
        "fields": dict(sample.get("fields") or {}),
    }
    labels = prompt_labels(sample)  # the label set named in the prompt (EMT classification)
    if labels:
        meta["labels"] = labels
    return meta
