"""Turn samples into model inputs with the family's chat template.

Training labels are the answer tokens only (assistant turns and their end-of-turn token);
prompt, padding and image tokens are -100. We find answer tokens by tokenising the rendered
conversation once with character offsets, then aligning with the processor's output, in which each
image placeholder is expanded to many image tokens. Tokenising the whole text once (instead of turn
by turn, as LLaVA's train.py does) avoids the off-by-one label shifts of per-turn tokenisation.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from PIL import Image

from mllm_cl.errors import DataError
from mllm_cl.families import Family

IGNORE = -100
# Bookkeeping keys a collated batch may carry besides model inputs (never passed to the model).
BOOKKEEPING_KEYS = ("meta", "skipped", "truncated")
# (height, width) sizes: the count formula must give one number for all of them to call it fixed, and
# match the processor's real output on the probes (small, so checking costs milliseconds).
_SPREAD = [(56, 56), (64, 64), (160, 96), (96, 160), (336, 336), (480, 640), (1024, 768), (3000, 2000),
           (300, 4000), (90, 1200)]  # fmt: skip
_PROBES = [(64, 64), (160, 96)]


def _collapse(ids: list[int], image_id: int) -> tuple[list[int], list[int]]:
    """Merge runs of the image token: ([a, I, I, I, b], I) -> ([a, I, b], [1, 3, 1])."""
    out, runs = [], []
    for tok in ids:
        if tok == image_id and out and out[-1] == image_id:
            runs[-1] += 1
        else:
            out.append(tok)
            runs.append(1)
    return out, runs


def prepare_messages(sample: dict, family: Family, for_generation: bool) -> list[dict]:
    """Put the family's image placeholder into the text; drop the last answer for generation."""
    messages = [dict(m) for m in sample["messages"]]
    n_images = len(sample.get("images") or [])
    n_marks = sum(m["content"].count("<image>") for m in messages)
    if n_images and n_marks == 0:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = "<image>\n" + first_user["content"]
        n_marks = n_images
    if n_marks != n_images:
        raise DataError(
            f"sample {sample.get('id')!r}: {n_marks} <image> placeholders but {n_images} images; "
            "give one <image> per image"
        )
    for m in messages:
        m["content"] = m["content"].replace("<image>", family.image_placeholder)
    if for_generation:
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
    return messages


@dataclass
class Encoder:
    """Encodes one sample (worker side) and pads a list of encodings (collate side).

    Args:
        family: the model family adapter.
        processor: its HF processor.
        max_length: longest token sequence kept.
        overlength: what to do with a longer sample: "truncate" (cut text tokens from the end, never
            inside an image), "skip" (drop it, counted) or "error".
    """

    family: Family
    processor: object
    max_length: int = 2048
    overlength: str = "skip"

    def _process(self, text: str, images: list) -> dict:
        kwargs = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        return dict(self.processor(**kwargs))

    def _process_tokens(self, text: str, images: list) -> dict:
        """What `_process` gives for the text (input_ids, attention_mask), pixels untouched: each image
        placeholder is expanded to the image's token count, as the processor would, then tokenised."""
        token = self.processor.image_token
        parts = text.split(token)
        if len(parts) - 1 != len(images):
            raise DataError(f"{len(parts) - 1} image placeholders in the text but {len(images)} images")
        counts = self.image_token_counts(images)
        expanded = parts[0] + "".join(token * n + part for n, part in zip(counts, parts[1:], strict=True))
        ids = self.processor.tokenizer([expanded], return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def image_token_counts(self, images: list) -> list[int]:
        """Tokens of each image (PIL image or `ImageRef`) without processing pixels; sizes are read
        only when the count depends on them."""
        rule = self._count_rule
        if isinstance(rule, int) or not images:
            return [rule] * len(images)
        sizes = [(img.size[1], img.size[0]) for img in images]  # (height, width), as the formula wants
        return [int(n) for n in self.processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens]

    @property
    def needs_pixels(self) -> bool:
        """Whether tokenising needs the processed images (an image token count we cannot predict)."""
        return self._count_rule is None

    @functools.cached_property
    def _count_rule(self) -> int | str | None:
        """An int: every image has that many tokens (LLaVA-1.5: 576, whatever its size); "sizes": the
        count follows the image size (Qwen2.5-VL's dynamic resolution); None: unknown, so the processor
        runs on the pixels as before. The processor's own count formula (the one vLLM uses) is trusted
        only where it agrees with what the processor really produces for two probe images."""
        predict = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if predict is None or getattr(self.processor, "image_token", None) is None:
            return None
        image_id, token = self.family.image_token_id(self.processor), self.processor.image_token
        try:
            spread = list(predict(image_sizes=_SPREAD).num_image_tokens)
            real = []
            for h, w in _PROBES:
                probe = self.processor(text=[token], images=[Image.new("RGB", (w, h))], return_tensors="pt")
                ids = probe["input_ids"]
                real.append(int((ids == image_id).sum()))
            if real != list(predict(image_sizes=_PROBES).num_image_tokens):
                return None
        except Exception:  # noqa: BLE001  (a processor without the formula, or a changed signature)
            return None
        return spread[0] if len(set(spread)) == 1 else "sizes"

    def encode_train(self, sample: dict) -> dict | None:
        """input_ids / labels / pixel tensors for one sample, or None when skipped for length."""
        if "_tokens" in sample:  # data.cache_processed: tokens from the cache, only images processed here
            return self._from_record(sample, sample["_tokens"])
        return self._train(sample, self._process)

    def _train(self, sample: dict, process) -> dict | None:
        rendered = self.family.render(prepare_messages(sample, self.family, for_generation=False))
        if not rendered.targets:
            raise DataError(f"sample {sample.get('id')!r} has no assistant answer to train on")
        out = process(rendered.text, sample.get("images") or [])
        ids = out["input_ids"][0].tolist()
        labels = self._labels(rendered, ids)
        if len(ids) > self.max_length:
            if self.overlength == "error":
                raise DataError(
                    f"sample {sample.get('id')!r} has {len(ids)} tokens > max_length={self.max_length}; "
                    "raise data.max_length or set data.overlength to truncate / skip"
                )
            image_id = self.family.image_token_id(self.processor)
            # Skipped too: a cut inside an image, or before every answer token (NaN loss).
            no_answer = all(x == IGNORE for x in labels[: self.max_length])
            if self.overlength == "skip" or image_id in ids[self.max_length :] or no_answer:
                return None
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            out = {
                k: (v[:, : self.max_length] if k in ("attention_mask", "mm_token_type_ids") else v)
                for k, v in out.items()
            }
            out["truncated"] = 1  # counted per batch by `collate`, logged as train/truncated_samples
        out["input_ids"] = torch.tensor([ids])
        out["labels"] = torch.tensor([labels])
        return out

    def record(self, sample: dict, prompt: bool = False) -> dict:
        """The compact cacheable form of `encode_train(sample)` (or `encode_prompt`, without labels):
        image-token runs collapsed to one id plus their lengths.

        Only tokens are kept, so no pixels are processed when the image token count is known without
        them (`needs_pixels` False): `sample`'s images then need only a `size` (an `ImageRef`)."""
        process = self._process if self.needs_pixels else self._process_tokens
        out = self._prompt(sample, process) if prompt else self._train(sample, process)
        if out is None:
            return {"ids": [], "labels": [], "image_runs": [], "skip": True, "truncated": False}
        image_id = self.family.image_token_id(self.processor)
        ids, runs = _collapse(out["input_ids"][0].tolist(), image_id)
        starts = [0, *itertools.accumulate(runs)][:-1]  # first position of each collapsed run
        labels = out["labels"][0].tolist() if not prompt else []
        return {
            "ids": ids,
            "labels": [labels[i] for i in starts] if not prompt else [],
            "image_runs": [n for tok, n in zip(ids, runs, strict=True) if tok == image_id],
            "skip": False,
            "truncated": bool(out.get("truncated", 0)),
        }

    def _from_record(self, sample: dict, record: dict) -> dict | None:
        if record["skip"]:
            return None
        image_id = self.family.image_token_id(self.processor)
        prompt = not record["labels"]  # prompt records carry no labels
        runs, ids, labels = iter(record["image_runs"]), [], []
        for tok, label in zip(record["ids"], record["labels"] or record["ids"], strict=True):
            n = next(runs) if tok == image_id else 1
            ids += [tok] * n
            labels += [label] * n
        input_ids = torch.tensor([ids])
        out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if "mm_token_type_ids" in self._text_keys:  # Qwen2.5-VL's processor marks image tokens with 1
            out["mm_token_type_ids"] = (input_ids == image_id).long()
        if sample.get("images"):
            out.update(self.processor.image_processor(images=sample["images"], return_tensors="pt"))
        if not prompt:
            out["labels"] = torch.tensor([labels])
        if record["truncated"]:
            out["truncated"] = 1
        return out

    @functools.cached_property
    def _text_keys(self) -> set[str]:
        """Keys the processor returns for plain text (what a cached record must rebuild)."""
        return set(self.processor(text=["a"], return_tensors="pt").keys())

    def _labels(self, rendered, ids: list[int]) -> list[int]:
        tok = self.processor.tokenizer
        plain = tok(rendered.text, return_offsets_mapping=True)
        text = rendered.text

        def in_answer(start: int, end: int) -> bool:
            return end > start and any(s <= start and end <= e for s, e in rendered.targets)

        # SentencePiece tokens own the space before them (LLaVA's '▁red' spans " red"): judge them without it.
        is_target = [
            in_answer(start, end) or in_answer(end - len(text[start:end].lstrip()), end)
            for start, end in plain["offset_mapping"]
        ]
        image_id = self.family.image_token_id(self.processor)
        short_x, runs = _collapse(ids, image_id)
        short_u, _ = _collapse(plain["input_ids"], image_id)
        if short_x != short_u:
            raise RuntimeError("processor and tokenizer disagree on the text tokens; cannot place labels")
        target_u = _collapse_flags(plain["input_ids"], is_target, image_id)
        labels = []
        for tok_id, run, target in zip(short_x, runs, target_u, strict=True):
            labels += [tok_id if target else IGNORE] * run
        return labels

    def encode_prompt(self, sample: dict) -> dict:
        """The prompt for generation (conversation up to the last user turn)."""
        if "_tokens" in sample:  # data.cache_processed
            return self._from_record(sample, sample["_tokens"])
        return self._prompt(sample, self._process)

    def _prompt(self, sample: dict, process) -> dict:
        messages = prepare_messages(sample, self.family, for_generation=True)
        rendered = self.family.render(messages, add_generation_prompt=True)
        return process(rendered.text, sample.get("images") or [])

    def collate(self, items: list[dict | None], padding_side: str = "right") -> dict:
        """Pad token tensors to the batch's longest and concatenate image tensors."""
        kept = [x for x in items if x is not None]
        batch = {"skipped": torch.tensor(len(items) - len(kept))}
        if not kept:
            return batch
        truncated = sum(int(x.pop("truncated", 0)) for x in kept)
        if truncated:  # only when it happened, so batches stay plain model inputs otherwise
            batch["truncated"] = torch.tensor(truncated)
        pad_id = self.processor.tokenizer.pad_token_id
        longest = max(x["input_ids"].shape[1] for x in kept)
        pads = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE, "mm_token_type_ids": 0}
        for key, value in pads.items():
            if key in kept[0]:
                batch[key] = torch.cat([_pad(x[key], longest, value, padding_side) for x in kept])
        for key in self.family.image_keys:  # other processor outputs are not model inputs here
            parts = [x[key] for x in kept if key in x]
            if parts:
                batch[key] = self.family.batch_images(key, parts)
        return batch


def _collapse_flags(ids: list[int], flags: list[bool], image_id: int) -> list[bool]:
    out = []
    for i, (tok, flag) in enumerate(zip(ids, flags, strict=True)):
        if tok == image_id and i and ids[i - 1] == image_id:
            continue
        out.append(flag and tok != image_id)
    return out


def _pad(t: torch.Tensor, length: int, value: int, side: str) -> torch.Tensor:
    extra = length - t.shape[1]
    if extra == 0:
        return t
    fill = torch.full((t.shape[0], extra), value, dtype=t.dtype)
    return torch.cat([t, fill] if side == "right" else [fill, t], dim=1)
