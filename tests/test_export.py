"""`python -m mllm_cl export` writes a standard Hugging Face checkpoint that the stock classes load
and that gives the same logits as our module on the same batch."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from mllm_cl.cli import main
from mllm_cl.commands import load_trained
from mllm_cl.data.collate import Encoder
from mllm_cl.families import Qwen25VLImageOnlyProcessor, get_family

CLASSES = {"llava": LlavaForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def synthetic(skill: str, seed: int) -> dict:
    return {"class_path": "Synthetic", "init_args": {"skill": skill, "n": 8, "seed": seed, "image_size": 32}}


@pytest.fixture(params=["llava", "qwen2_5_vl"])
def trained(request, tmp_path):
    """(family, config path, last.ckpt) of a two-task SAProj run."""
    family = request.param
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "x", "version": "v"},
            },
        },
        "model": {"family": family, "recipe": {"class_path": "SAProj"}, "lr": 1e-2, "max_new_tokens": 2},
        "data": {
            "batch_size": 4,
            "tasks": [
                {"name": "a", "train": synthetic("colour", 1), "steps": 3},
                {"name": "b", "train": synthetic("shape", 2), "steps": 3},
            ],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    return family, path, tmp_path / "runs" / "x" / "v" / "checkpoints" / "last.ckpt"


def one_batch(module) -> dict:
    """A collated one-sample training batch (image + answer) for comparing logits."""
    sample = {
        "id": "x",
        "images": [Image.new("RGB", (32, 32), (10, 200, 30))],
        "messages": [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "green"}],
    }
    encoder = Encoder(module.family, module.processor)
    batch = encoder.collate([encoder.encode_train(sample)])
    batch.pop("skipped")
    return batch


def test_export_loads_in_transformers_with_identical_logits(trained, tmp_path):
    family, config, ckpt = trained
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--out", str(out)])
    assert exit_info.value.code == 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    module = load_trained(str(config), str(ckpt))
    module.model.eval()
    trained_w = dict(module.model.named_parameters())
    initial, _ = get_family(family).build_tiny("tiny")
    changed = [n for n, p in initial.named_parameters() if not torch.equal(p, trained_w[n])]
    assert changed and all("self_attn" in n for n in changed)  # the checkpoint's trained weights were used

    model = CLASSES[family].from_pretrained(out).eval()
    processor_cls = Qwen25VLImageOnlyProcessor if family == "qwen2_5_vl" else None
    processor = get_family(family).load_processor(str(out))
    if processor_cls:
        assert isinstance(processor, processor_cls)
    assert processor.chat_template  # a Jinja template equivalent to Family.render

    batch = one_batch(module)
    with torch.no_grad():
        ours = module.model(**batch).logits
        theirs = model(**batch).logits
    assert torch.equal(ours, theirs)

    # The exported chat template renders what Family.render renders (the training format).
    rendered = module.family.render(
        [{"role": "user", "content": module.family.image_placeholder + "\nWhat colour?"}],
        add_generation_prompt=True,
    ).text
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == rendered


def test_export_refuses_a_garbage_checkpoint(trained, tmp_path, capsys):
    _, config, _ = trained
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--config", str(config), "--ckpt_path", str(bad), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "bad.ckpt" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o").exists()


def test_safetensors_hold_the_trained_weights(trained, tmp_path):
    """Every tensor in model.safetensors is the checkpoint's trained value (or the untouched initial
    one for a frozen weight), under the name the stock class loads it by."""
    family, config, ckpt = trained
    out = tmp_path / "hf2"
    with pytest.raises(SystemExit):
        main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--out", str(out)])
    weights = load_file(out / "model.safetensors")
    trained_state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    trained_state = {k.removeprefix("model."): v for k, v in trained_state.items()}
    initial, _ = get_family(family).build_tiny("tiny")
    loaded = CLASSES[family].from_pretrained(out)
    names = dict(loaded.named_parameters())
    assert set(names) == {n for n, _ in initial.named_parameters()}
    assert trained_state and set(trained_state) <= set(names)
    for name, p in initial.named_parameters():
        want = trained_state.get(name, p.detach())  # frozen (SAProj): as built from the tiny seed
        assert torch.equal(names[name].detach(), want), name
    assert any(not torch.equal(trained_state[n], dict(initial.named_parameters())[n]) for n in trained_state)
    # The file itself (whose names follow the classes' save format) holds each trained tensor as is.
    assert len(weights) == len(names)
    for name, value in trained_state.items():
        assert any(v.shape == value.shape and torch.equal(v, value) for v in weights.values()), name


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_export_merges_lora_into_plain_weights(family, tmp_path):
    """A LoRA-trained model exports as plain HF weights with the adapter update merged in."""
    from mllm_cl.export import export_hf, gathered_state_dict
    from mllm_cl.module import MLLMModule
    from strategies import LoRA, SAProj

    module = MLLMModule(family=family, tiny="tiny", recipe=SAProj(), strategies=[LoRA(r=4, alpha=8)])
    module.configure_model()
    with torch.no_grad():  # a non-zero adapter update, as after some training
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = one_batch(module)
    module.model.eval()
    with torch.no_grad():
        ours = module.model(**batch).logits
    # Both export paths: the model merged in a copy, and the gathered state dict (the FSDP2 path;
    # torch.distributed.checkpoint also gathers an unsharded model) with LoRA folded in.
    for out, state in [(tmp_path / "copy", None), (tmp_path / "gathered", gathered_state_dict(module.model))]:
        export_hf(module.model, module.processor, str(out), family, state)
        assert any("lora_" in n for n, _ in module.model.named_parameters())  # the live model is untouched
        exported = CLASSES[family].from_pretrained(out).eval()
        assert not any("lora_" in n or "base_layer" in n for n, _ in exported.named_parameters())
        with torch.no_grad():
            theirs = exported(**batch).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
