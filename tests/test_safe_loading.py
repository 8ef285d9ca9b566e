"""Safe loading: our checkpoints load with torch.load(weights_only=True), `fit` resumes with
weights_only=True, no strategy object is pickled, and remote code needs model.trust_remote_code."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import yaml

from mllm_cl.cli import main
from mllm_cl.module import MLLMModule
from tests.helpers import ROOT


def test_our_code_loads_only_with_weights_only():
    offenders = []
    for path in [*ROOT.glob("mllm_cl/**/*.py"), *ROOT.glob("strategies/**/*.py")]:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}")
    assert not offenders


def test_checkpoint_is_weights_only_loadable_and_has_no_pickled_objects(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_llava_test.yaml").read_text())
    cfg["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path), "name": "s", "version": "v"},
    }
    cfg["data"]["tasks"] = cfg["data"]["tasks"][:1]
    cfg["data"]["tasks"][0]["steps"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    ckpt = tmp_path / "s" / "v" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # raises on any non-allowlisted type
    hparams = state["hyper_parameters"]
    assert "recipe" not in hparams and "strategies" not in hparams
    json.dumps({k: v for k, v in hparams.items() if not k.startswith("_")})  # plain values only
    # Resuming a finished run with weights_only=True loads the checkpoint, trains nothing more and
    # leaves the results and the checkpoint as they were.
    run = tmp_path / "s" / "v"
    before = (run / "results.json").read_text(), state["global_step"], state["state_dict"]
    assert json.loads(before[0])["row_labels"] == ["base", "count"] and before[1] == 2
    main(["fit", "--config", str(path), "--ckpt_path", "last"])
    after = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (run / "results.json").read_text() == before[0]
    assert after["global_step"] == before[1]
    assert after["state_dict"].keys() == before[2].keys()
    assert all(torch.equal(after["state_dict"][k], before[2][k]) for k in before[2])

    # A checkpoint that runs code when unpickled is refused in one line, and its code never runs.
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({**after, "payload": RunsCode(str(marker))}, evil)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--ckpt_path", str(evil)])
    assert exit_info.value.code == 2
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    assert not marker.exists()


class RunsCode:
    """Unpickling this calls open(path, "w"): the marker file appears only if the pickle was trusted."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_remote_code_is_not_run_without_trust_remote_code(tmp_path):
    """A checkpoint dir whose config maps to custom code: refused (not executed) by default."""
    from mllm_cl.families import get_family

    model, processor = get_family("llava").build_tiny("tiny")
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlavaConfig, LlavaForConditionalGeneration\n"
        "class EvilConfig(LlavaConfig):\n    model_type = 'llava'\n"
        "class EvilModel(LlavaForConditionalGeneration):\n    config_class = EvilConfig\n"
    )
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    module = MLLMModule(family="llava", pretrained=str(tmp_path))
    assert module.hparams.trust_remote_code is False
    module.configure_model()  # loads the stock class from the weights; the custom code never runs
    assert type(module.model).__name__ == "LlavaForConditionalGeneration"
    assert not marker.exists()
