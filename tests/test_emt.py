"""EMT (mllm_cl/emt.py): label prompts parsed, the unmatched (hallucination) rate reported, and CLIP
zero-shot accuracy on the same label sets from a tiny offline CLIP, beside the MLLM's accuracy."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers.processors import TemplateProcessing
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from mllm_cl.data import Synthetic, Task, TaskStream
from mllm_cl.data.meta import prompt_labels
from mllm_cl.emt import CLIPBaseline, clip_zero_shot
from mllm_cl.families import get_family
from mllm_cl.metrics import build_metric
from mllm_cl.module import MLLMModule
from mllm_cl.report import compare
from mllm_cl.tiny import build_tokenizer
from strategies.freeze import SAProj


def asked(text: str) -> dict:
    return {"messages": [{"role": "user", "content": "<image>\n" + text}]}


@pytest.mark.parametrize(
    "prompt,labels",
    [
        # EMT's classification prompts name the label set in brackets at the end.
        (
            "What is the object in the image? Please only answer a single object in [airplane, automobile, bird]",
            ["airplane", "automobile", "bird"],
        ),
        ("What is the number in the image? Please choose a number in [0, 1, 2, 3].", ["0", "1", "2", "3"]),
        ("Which one is it, from ['maple tree', 'oak tree']?", ["maple tree", "oak tree"]),
        ("Which shape is this? Choose one of: circle, square, triangle.", ["circle", "square", "triangle"]),
        ("What is in the image?", None),
    ],
)
def test_emt_label_prompts_are_parsed(prompt, labels):
    assert prompt_labels(asked(prompt)) == labels


def test_unmatched_rate_is_a_reported_part():
    metric = build_metric("emt", labels=["cat", "dog", "hot dog"])
    # "cat" right; "a dog" right; "The airplane is 8." names no label; "cat or dog" names two; "hot dog"
    # names the longer label only (wrong: the reference is dog).
    metric.update(
        ["cat", "a dog", "The airplane is 8.", "cat or dog", "hot dog"], ["cat", "dog", "cat", "cat", "dog"]
    )
    parts = {k: float(v) for k, v in metric.compute_parts().items()}
    assert parts == pytest.approx({"accuracy": 2 / 5, "unmatched": 2 / 5})


def tiny_clip(folder) -> str:
    """A random CLIP with the tiny word-level tokenizer (+ </s> appended) and a 32 px image processor."""
    tok = build_tokenizer(get_family("llava").tiny_specials)
    eos = tok.convert_tokens_to_ids("</s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos)]
    )
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, eos_token_id=eos, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return str(folder)


def by_clip_forward(path: str, samples, template: str) -> float:
    """Accuracy from CLIPModel's own forward (logits_per_image), labels split from the prompt by hand."""
    model, tok, proc = (
        CLIPModel.from_pretrained(path).eval(),
        AutoTokenizer.from_pretrained(path),
        AutoImageProcessor.from_pretrained(path),
    )
    correct = 0
    for s in samples:
        labels = s["messages"][0]["content"].split("Choose one of:")[1].strip().rstrip(".").split(", ")
        texts = tok([template.format(x) for x in labels], padding=True, return_tensors="pt")
        pixels = proc(images=s["images"][:1], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = model(
                input_ids=texts["input_ids"], attention_mask=texts["attention_mask"], pixel_values=pixels
            ).logits_per_image
        correct += labels[int(logits[0].argmax())] == s["answers"][0]
    return correct / len(samples)


def test_clip_baseline_beside_the_mllm_through_a_fit(tmp_path):
    path = tiny_clip(tmp_path / "clip")
    data = Synthetic("classify", n=12, seed=4, image_size=32)
    samples = [data.load()[i] for i in range(12)]
    want = by_clip_forward(path, samples, "a {}.")
    direct = clip_zero_shot(
        CLIPModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
        samples, "a {}.", batch_size=5,
    )  # fmt: skip
    assert direct == pytest.approx({"accuracy": want, "n": 12.0})

    L.seed_everything(0)
    module = MLLMModule(family="llava", recipe=SAProj(), lr=1e-2, max_new_tokens=3)
    train = Synthetic("classify", n=16, seed=3, image_size=32)
    stream = TaskStream(tasks=[Task("classify", train=train, eval=data, steps=2, metric="emt")], batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[CLIPBaseline(path, template="a {}.")],
        logger=TensorBoardLogger(str(tmp_path), name="tb", version="v"),
    )  # fmt: skip
    trainer.fit(module, datamodule=stream)
    run = tmp_path / "tb" / "v"
    record = json.loads((run / "emt_baseline.json").read_text())
    assert (
        record["sets"]["classify"]["accuracy"] == pytest.approx(want)
        and record["sets"]["classify"]["n"] == 12
    )
    events = EventAccumulator(str(run))
    events.Reload()
    assert events.Scalars("emt/clip/classify")[0].value == pytest.approx(want)
    assert "parts/classify/unmatched" in events.Tags()["scalars"]
    results = json.loads((run / "results.json").read_text())
    assert len(results["parts"]) == 2 and all("unmatched" in p["classify"] for p in results["parts"])
    final = results["parts"][-1]["classify"]
    records = [
        json.loads(x)
        for x in (run / "predictions" / "1_classify" / "classify.jsonl").read_text().splitlines()
    ]
    metric = build_metric("emt")
    by_hand = sum(
        metric.match_label(r["prediction"], prompt_labels(asked(r["prompt"]))) is None for r in records
    )
    assert final["unmatched"] == pytest.approx(by_hand / len(records))
    text = compare([str(run)])
    assert "EMT, the MLLM vs its vision encoder" in text
    row = next(line for line in text.splitlines() if line.startswith("| classify |") and line.count("|") == 7)
    assert row.split("|")[2].strip() == f"{want * 100:.1f}"
