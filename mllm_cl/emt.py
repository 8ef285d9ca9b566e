"""EMT (Zhai et al. 2023): the MLLM as an image classifier, beside its own vision encoder.

EMT prompts the MLLM with the label set ("... in [airplane, automobile, ...]" or "Choose one of: a,
b.") and asks how far fine-tuning moves it from what its vision encoder alone does: CLIP zero-shot
classification on the same labels. Both are scored here on the same samples:

* the MLLM: the ``emt`` metric (`mllm_cl.metrics.EMTClassification`, normalised label match; answers
  naming no label or several are *unmatched*, EMT's hallucinations, logged as ``parts/<set>/unmatched``
  and kept per row in results.json);
* the encoder (`clip_zero_shot`): per sample, the labels of its prompt (`mllm_cl.data.meta.prompt_labels`),
  texts ``template.format(label)``, the label whose text embedding has the highest cosine
  similarity with the image embedding; correct when it equals a reference answer after
  `normalize_answer`. EMT used an LLM judge for the MLLM; we match text (see the metric).

`CLIPBaseline` (a callback) scores a CLIP checkpoint once before training on the stream's EMT sets,
logs ``emt/clip/<set>`` and writes ``emt_baseline.json`` in the run directory; `python -m mllm_cl
report` prints it next to the MLLM's accuracy before and after training and its unmatched rate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import lightning as L
import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from mllm_cl.data.meta import prompt_labels
from mllm_cl.errors import ConfigError, DataError
from mllm_cl.metrics import normalize_answer
from mllm_cl.results import atomic_write
from mllm_cl.sharding import local_log_dir


@torch.no_grad()
def _embed_texts(model, tokenizer, texts: list[str], device) -> torch.Tensor:
    tokens = tokenizer(texts, padding=True, return_tensors="pt").to(device)
    out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out).float(), dim=-1)


@torch.no_grad()
def _embed_images(model, image_processor, images: list, device) -> torch.Tensor:
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    out = model.get_image_features(pixel_values=pixels)
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out).float(), dim=-1)


def clip_zero_shot(
    model,
    tokenizer,
    image_processor,
    samples: Sequence[dict],
    template: str = "a photo of a {}.",
    batch_size: int = 32,
) -> dict[str, float]:
    """CLIP zero-shot accuracy on EMT samples (see the module docstring): {"accuracy", "n"}."""
    device = next(model.parameters()).device
    model.eval()
    label_cache: dict[str, torch.Tensor] = {}
    correct = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [s["images"][0] if s.get("images") else None for s in chunk]
        if any(img is None for img in images):
            raise DataError(f"CLIP zero-shot: sample {chunk[images.index(None)]['id']!r} has no image")
        image_emb = _embed_images(model, image_processor, images, device)
        for sample, emb in zip(chunk, image_emb, strict=True):
            labels = prompt_labels(sample)
            if not labels:
                raise DataError(f"CLIP zero-shot: sample {sample['id']!r} names no label set in its prompt")
            missing = [x for x in labels if x not in label_cache]
            if missing:
                texts = _embed_texts(model, tokenizer, [template.format(x) for x in missing], device)
                label_cache.update(zip(missing, texts, strict=True))
            scores = torch.stack([label_cache[x] for x in labels]) @ emb
            chosen = normalize_answer(labels[int(scores.argmax())])
            correct += chosen in {normalize_answer(a) for a in sample["answers"]}
    return {"accuracy": correct / len(samples) if samples else float("nan"), "n": float(len(samples))}


class CLIPBaseline(L.Callback):
    """Scores a CLIP checkpoint zero-shot on the stream's EMT eval sets before training.

    Args:
        clip: a local CLIP checkpoint folder or hub id (model, tokenizer and image processor).
        sets: eval set names (default: every eval set whose metric is "emt").
        template: the text prompt of a label.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        clip: str,
        sets: list[str] | None = None,
        template: str = "a photo of a {}.",
        batch_size: int = 32,
    ):
        if "{}" not in template:
            raise ConfigError(f"CLIPBaseline.template={template!r} needs a {{}} for the label")
        self.clip, self.sets, self.template, self.batch_size = clip, sets, template, batch_size
        self.results: dict[str, dict[str, float]] = {}

    def on_train_start(self, trainer, pl_module):
        if self.results:
            return  # resumed: scored already (the CLIP model never changes)
        stream = trainer.datamodule
        emt = [c.name for c in stream.columns if c.metric == "emt"]
        names = self.sets if self.sets is not None else emt
        if unknown := [n for n in names if n not in stream.eval_names]:
            raise ConfigError(f"CLIPBaseline.sets {unknown}: the stream's eval sets are {stream.eval_names}")
        model = CLIPModel.from_pretrained(self.clip).to(pl_module.device)
        tokenizer, image_processor = (
            AutoTokenizer.from_pretrained(self.clip),
            AutoImageProcessor.from_pretrained(self.clip),
        )
        sources = {name: source for name, source, _, _ in stream.eval_specs()}
        for name in names:
            table = sources[name].load()
            samples = [table[i] for i in range(min(len(table), stream.eval_limit or len(table)))]
            self.results[name] = clip_zero_shot(
                model, tokenizer, image_processor, samples, self.template, self.batch_size
            )
        del model
        self.publish(trainer)

    def publish(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"emt/clip/{k}": v["accuracy"] for k, v in self.results.items()}, step=0
            )
        log_dir = local_log_dir(trainer)
        if log_dir:
            record = {"clip": self.clip, "template": self.template, "sets": self.results}
            atomic_write(os.path.join(log_dir, "emt_baseline.json"), json.dumps(record, indent=2))

    def state_dict(self):
        return {"results": json.dumps(self.results)}

    def load_state_dict(self, state_dict):
        self.results = json.loads(state_dict.get("results", "{}"))
