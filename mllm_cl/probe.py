"""Counting-bias probe: how much probability the model puts on number tokens while it answers.

Definition (Zhu et al. 2025, "How to Teach Large Multimodal Models New Skills", counting-bias
analysis; the number-token set of LMM_CL's `scripts/analysis/output_logit_single_model_inference.py`):
a vocabulary entry is a *number token* when, once surrounding whitespace and the space markers
(byte-level BPE `Ġ`, SentencePiece `▁`) are stripped from both ends, it is all ASCII digits, a digit
ordinal (1st, 22nd), a single-token decimal (3.5) or comma number (3,000), each with a digit at both
ends, or a number word (zero–twenty, the tens, hundred / thousand / million / billion),
case-insensitively. Word ordinals (first–twentieth) are not in upstream's set: `ordinals=True` adds
them (off by default). Deliberate difference: upstream lower-cases before stripping the markers, and
``"Ġ".lower()`` is ``"ġ"``, so byte-level BPE vocabularies (Qwen2's, LLaVA-OneVision's) lose every
space-prefixed number word (``Ġtwenty``); we strip first, so ``Ġtwenty`` counts as ``▁twenty`` does.

For a prompt, greedy decoding runs for up to `max_new_tokens` steps (upstream: 256; through the
end-of-turn token).
At step t with raw logits z_t (before any logits processor) and p_t = softmax(z_t) over the whole
vocabulary we record

    max_logit_t = max_{v in N} z_t[v],   max_prob_t = max_{v in N} p_t[v],   mass_t = sum_{v in N} p_t[v],

average each over the sample's steps, then report mean and std (population, ddof=0) over samples.
A model that forgot how to stop counting after a counting task shows a high `number_mass` on caption
prompts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from mllm_cl.evaluation import eval_mode, prompt_batches
from mllm_cl.generation import generate_ids

NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
    "hundred thousand million billion".split()
)
ORDINAL_WORDS = frozenset(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split()
)
_DIGIT_FORMS = re.compile(r"^(?:[0-9]+|[0-9]+(?:st|nd|rd|th)|[0-9]+[.,][0-9]+)$")
_SPACE_MARKERS = "Ġ▁"
DEFAULT_MAX_NEW_TOKENS = 256  # LMM_CL's decode length


def is_number_token(token: str, ordinals: bool = False) -> bool:
    """True for a token string (as in the vocabulary) that names a number; see the module docstring."""
    text = token.strip().strip(_SPACE_MARKERS).lower()
    if not text:
        return False
    words = NUMBER_WORDS | ORDINAL_WORDS if ordinals else NUMBER_WORDS
    return bool(_DIGIT_FORMS.match(text)) or text in words


def number_token_ids(tokenizer, ordinals: bool = False) -> list[int]:
    """Sorted ids of the number tokens of `tokenizer`'s vocabulary (special tokens excluded)."""
    special = set(tokenizer.all_special_ids)
    return sorted(
        i for tok, i in tokenizer.get_vocab().items() if i not in special and is_number_token(tok, ordinals)
    )


def step_stats(logits: torch.Tensor, number_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row statistics of one decoding step's raw logits (B, V) -> three (B,) tensors."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)[:, number_ids]
    return {
        "max_number_logit": logits[:, number_ids].max(dim=-1).values,
        "max_number_prob": probs.max(dim=-1).values,
        "number_mass": probs.sum(dim=-1),
    }


def _batch_stats(module, batch: dict, number_ids: torch.Tensor, max_new_tokens: int) -> list[dict]:
    tok = module.processor.tokenizer
    out = generate_ids(
        module.model,
        tok,
        module.family.end_of_turn,
        batch,
        max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    eos = tok.convert_tokens_to_ids(module.family.end_of_turn)
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    # A row's steps run through its first end-of-turn token; later steps are padding of finished rows.
    done_before = torch.cumsum((new == eos).int(), dim=1) - (new == eos).int() > 0
    valid = (~done_before).float()
    per_step = [step_stats(z, number_ids) for z in out.logits]
    rows = []
    for r in range(new.shape[0]):
        n = valid[r].sum()
        rows.append(
            {k: float(sum(s[k][r] * valid[r, t] for t, s in enumerate(per_step)) / n) for k in per_step[0]}
        )
    return rows


def probe(
    module,
    samples: Sequence[dict],
    batch_size: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ordinals: bool = False,
) -> dict[str, float]:
    """Counting-bias statistics of `module` (an `MLLMModule` with a built model) on `samples`.

    Returns mean and std over samples of number_mass, max_number_prob and max_number_logit, and n.
    """
    if not samples:
        raise ValueError("probe needs at least one sample")
    tok = module.processor.tokenizer
    number_ids = torch.tensor(number_token_ids(tok, ordinals), device=module.device)
    if number_ids.numel() == 0:
        raise ValueError("the tokenizer has no number tokens; the counting-bias probe is undefined")
    rows = []
    with eval_mode(module.model):
        for batch in prompt_batches(module, samples, batch_size):
            rows += _batch_stats(module, batch, number_ids, max_new_tokens)
    out: dict[str, float] = {"n": float(len(rows))}
    for key in rows[0]:
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        out[key], out[f"{key}_std"] = float(values.mean()), float(values.std(unbiased=False))
    return out
