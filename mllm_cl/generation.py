"""Greedy generation on a left-padded batch, with answers identical to generating one prompt at a time.

Why batching can change answers (lmms-eval #236, LLaVA #1928) and what we do about each cause:

* Padding side: prompts must be *left*-padded so every prompt's last token sits at the same column
  and the first generated token is predicted from it (`TaskStream` collates eval batches that way).
* Attention mask: pad columns must be masked for every step, including the cached ones; HF
  `generate` extends the mask we pass, so we always pass it.
* Positions: a left-padded row must still start at position 0. HF derives 1-D positions from the
  mask (cumsum) and Qwen2.5-VL's 3-D M-RoPE positions from the mask and `image_grid_thw`, so both
  are right as long as the mask is given; `tests/test_generation.py` checks it for batch 1, 3, 8.
* Floating point: a padded batch changes the shapes of the matmuls and SDPA kernels, which can
  change logits in the last bits; a near-tie can then flip the argmax. In float32 on the tiny
  models this does not happen (the test compares token ids); in bf16 at 7B scale it may, rarely.

Stop strings end a row's generation early (a `StoppingCriteria` on the decoded text) and cut the
decoded answer at the first stop string.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mllm_cl.data.collate import BOOKKEEPING_KEYS
from mllm_cl.errors import ConfigError
from mllm_cl.metrics import build_metric

NOT_MODEL_INPUTS = ("labels", *BOOKKEEPING_KEYS)


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its newly generated text contains any of `stops`."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, list(stops), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def cut_at_stop(text: str, stops: Sequence[str] | None) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops or ()) if i >= 0), default=len(text))
    return text[:cut]


def model_inputs(batch: dict) -> dict:
    """The tensors of a collated batch that the HF model takes."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def generate_ids(
    model,
    tokenizer,
    eos_token: str,
    batch: dict,
    max_new_tokens: int,
    stop: Sequence[str] | None = None,
    synced_gpus: bool = False,
    **kwargs,
):
    """HF greedy `generate` on a left-padded batch; returns its output (ids, or a dict with scores)."""
    inputs = model_inputs(batch)
    if "attention_mask" not in inputs:
        raise ValueError("generation needs the batch's attention_mask (left padding is otherwise unmasked)")
    prompt_len = inputs["input_ids"].shape[1]
    criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop, prompt_len)] if stop else [])
    return model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(eos_token),
        stopping_criteria=criteria,
        synced_gpus=synced_gpus,
        **kwargs,
    )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    eos_token: str,
    batch: dict,
    max_new_tokens: int,
    stop: Sequence[str] | None = None,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy answers (decoded, cut at the first stop string, stripped) for a left-padded batch."""
    out = generate_ids(model, tokenizer, eos_token, batch, max_new_tokens, stop, synced_gpus)
    new = out[:, batch["input_ids"].shape[1] :]
    return [cut_at_stop(t, stop).strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def eval_options(stream, column: int) -> dict:
    """Per-eval-set settings of a `TaskStream` column (tasks with an eval set first, then held-out)."""
    owners = [t for t in stream.tasks if t.eval is not None] + list(stream.heldout)
    owner = owners[column]
    return {
        "metric_args": dict(owner.metric_args or {}),
        "eval_batch_size": owner.eval_batch_size,
        "max_new_tokens": owner.max_new_tokens,
        "stop": list(owner.stop) if owner.stop else None,
        # A task's own eval set is in-domain for both axes by construction.
        "image_domain": getattr(owner, "image_domain", "id"),
        "text_domain": getattr(owner, "text_domain", "id"),
    }


def build_eval_metric(stream, column: int):
    """The column's metric with its `metric_args`; a bad name or argument -> one-line ConfigError."""
    name, args = stream.eval_metric(column), eval_options(stream, column)["metric_args"]
    try:
        return build_metric(name, **args)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"eval set {stream.eval_names[column]!r}: metric {name!r} with metric_args {args}: {err}"
        ) from err


def score_batch(module, batch: dict, metric, column_options: dict) -> list[str]:
    """Generate answers for one eval batch and add the weighted ones to `metric`; returns the answers."""
    preds = module.generate(batch, column_options.get("max_new_tokens"), column_options.get("stop"))
    kept = [(p, m) for p, m in zip(preds, batch["meta"], strict=True) if m["weight"]]
    if kept:
        answers = [m["answers"] for _, m in kept]
        if all("labels" in m for _, m in kept) and _takes_labels(metric):
            metric.update([p for p, _ in kept], answers, labels=[m["labels"] for _, m in kept])
        else:
            metric.update([p for p, _ in kept], answers)
    return preds


def _takes_labels(metric) -> bool:
    import inspect

    return "labels" in inspect.signature(metric.update).parameters


_CHOOSE = re.compile(r"choose one of:\s*(.+?)\.?\s*$", re.IGNORECASE | re.DOTALL)


def prompt_labels(sample: dict) -> list[str] | None:
    """A sample's label set: its `labels` field, else parsed from "Choose one of: a, b, c." in its last question."""
    if sample.get("labels"):
        return [str(x) for x in sample["labels"]]
    users = [m["content"] for m in sample.get("messages", []) if m["role"] == "user"]
    found = _CHOOSE.search(users[-1]) if users else None
    return [x.strip() for x in found.group(1).split(",") if x.strip()] if found else None


def eval_domains(stream) -> dict[str, dict[str, str]]:
    """{column: {"image": ..., "text": ...}} of every eval set, for the 2x2 ID/OOD report."""
    domains = {}
    for column, name in enumerate(stream.eval_names):
        options = eval_options(stream, column)
        for axis in ("image_domain", "text_domain"):
            if options[axis] not in ("id", "ood"):
                raise ConfigError(f"eval set {name!r}: {axis}={options[axis]!r}; use 'id' or 'ood'")
        domains[name] = {"image": options["image_domain"], "text": options["text_domain"]}
    return domains


def write_eval_results(module, values: dict, counts: dict | None = None) -> str | None:
    """`eval_<validate|test>.json` in the run dir: what was evaluated and the accuracy per eval set."""
    from mllm_cl.results import atomic_write
    from mllm_cl.sharding import local_log_dir  # trainer.log_dir broadcasts: a rank-0-only call would hang

    trainer = module.trainer
    log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
    if not log_dir:
        return None

    stage = str(trainer.state.fn.value if hasattr(trainer.state.fn, "value") else trainer.state.fn)
    record = {
        "stage": stage,
        "ckpt_path": trainer.ckpt_path,
        "pretrained": module.hparams.get("pretrained"),
        "accuracy": {k: float(v) for k, v in values.items()},
        "samples": counts or {},  # scored samples per eval set, over all ranks
        "domains": eval_domains(trainer.datamodule),
    }
    path = os.path.join(log_dir, f"eval_{stage}.json")
    atomic_write(path, json.dumps(record, indent=2))
    print(
        f"[mllm_cl] {stage}: "
        + ", ".join(f"{k}={v:.3f}" for k, v in record["accuracy"].items())
        + f" -> {path}"
    )
    return path
