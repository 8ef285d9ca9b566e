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

Generation is truly greedy whatever the checkpoint's `generation_config.json` says: sampling, beams
and every logit processor a config can switch on (repetition penalty, n-gram blocking, forced or
suppressed tokens, minimum length) are overridden, as the papers' evaluation decodes greedily.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mllm_cl.data.collate import BOOKKEEPING_KEYS

NOT_MODEL_INPUTS = ("labels", *BOOKKEEPING_KEYS)

# Keyword arguments to `generate` outrank the model's generation_config (transformers 5): these make
# decoding plain argmax whatever a checkpoint ships (e.g. Qwen2.5-VL's repetition_penalty 1.05, top_k 1).
GREEDY = {
    "do_sample": False,
    "num_beams": 1,
    "temperature": None,
    "top_p": None,
    "top_k": None,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
}


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
        **GREEDY,
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
