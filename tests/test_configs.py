"""Every YAML in configs/ parses with the CLI's own parser (no training, no network), alone or composed.

Configs are collected when the tests are collected, so a new config is covered without editing
this file. configs/ holds one-command configs at the top and pieces that combine with repeated
``--config``: stream/ (tasks and eval sets), model/ (checkpoint and trainer settings), method/
(recipe and strategies) and paper/ (a stream + model, included by the top-level paper configs). A
piece is parsed inside a stack that completes it; a top-level paper config must parse exactly like
the stack its header names (``# Stack: --config ...``). Configs that build a tiny model (no
`model.pretrained`) are also instantiated; those naming a hub checkpoint are only parsed, since
instantiating them would fetch a processor.
"""

from __future__ import annotations

import functools
import itertools
import re
from pathlib import Path

import pytest
import yaml

from mllm_cl.cli import MllmCLI, main
from mllm_cl.data.stream import TaskStream
from mllm_cl.module import MLLMModule
from strategies.freeze import Recipe

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TOP = sorted((ROOT / "configs").glob("*.yaml"))
STREAMS = sorted((ROOT / "configs" / "stream").glob("*.yaml"))
MODELS = sorted(p for p in (ROOT / "configs" / "model").glob("*.yaml") if "pixels" not in p.name)
OVERLAYS = sorted((ROOT / "configs" / "model").glob("*pixels*.yaml"))
METHODS = sorted((ROOT / "configs" / "method").glob("*.yaml"))
LLAVA, LMM_CL, SAPROJ = (
    ROOT / "configs" / p for p in ("model/llava-1.5-7b.yaml", "stream/lmm_cl.yaml", "method/saproj.yaml")
)
TINY = ROOT / "configs" / "tiny_llava_test.yaml"
PRESETS_HELDOUT = {
    "ai2d",
    "chartqa",
    "docvqa_val",
    "infovqa_val",
    "realworldqa",
    "scienceqa_img",
    "mmstar",
    "ocrbench",
    "seedbench",
}
PRESETS_TASKS = ["cub200", "pixmocount", "pathvqa", "textvqa", "timeclock"]  # LMM_CL's training order


class _Parsed(Exception):
    """Raised by `_ParseOnly` after parsing, carrying the CLI object."""


class _ParseOnly(MllmCLI):
    """MllmCLI that stops after parsing: before any class is instantiated or anything runs."""

    def before_instantiate_classes(self):
        raise _Parsed(self)


def parse(args: list[str]) -> MllmCLI:
    try:
        _ParseOnly(MLLMModule, TaskStream, args=args)
    except _Parsed as parsed:
        return parsed.args[0]
    raise AssertionError("the CLI did not stop after parsing")


def stack_args(paths) -> list[str]:
    return [a for p in paths for a in ("--config", str(p))]


@functools.cache
def _parser():
    """The CLI's parser, built once: building it costs as much as a parse (about a second)."""
    return parse(["fit", "--config", str(TINY)]).parser


@functools.cache
def _fit(paths: tuple):
    return _parser().parse_args(["fit", *stack_args(paths)])


def fit(paths):
    """The parsed fit config of a ``--config`` stack (each stack parsed once per session)."""
    return _fit(tuple(paths)).fit.clone()


def declared_stack(path: Path) -> list[Path] | None:
    line = next((x for x in path.read_text().splitlines()[:12] if x.startswith("# Stack:")), None)
    return None if line is None else [ROOT / p for p in re.findall(r"--config (\S+)", line)]


def completing_stack(path: Path) -> list[Path]:
    """A stack in which `path` is complete: pieces get the missing stream / model / method."""
    part = path.parent.name
    if part == "stream":
        return [path, LLAVA, SAPROJ]
    if part == "model":
        base = [ROOT / "configs" / "model" / "qwen2.5-vl-7b.yaml"] if path in OVERLAYS else []
        return [LMM_CL, *base, path, SAPROJ]
    if part == "method":
        return [LMM_CL, LLAVA, path]
    if "data" not in yaml.safe_load(path.read_text()) and part == "configs" and not declared_stack(path):
        return [TINY, path]  # trainer-only configs are combined with a model/data config
    return [path]


def test_there_are_configs_and_pieces():
    assert TOP and STREAMS and MODELS and METHODS, "configs/ lacks top-level configs or pieces"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_header_says_how_to_run_it(path):
    head = path.read_text().splitlines()[:10]
    comments = [line for line in head if line.lstrip().startswith("#")]
    assert any("python -m mllm_cl" in line for line in comments), (
        f"{path.name}: the first lines need a comment saying how to run it (python -m mllm_cl ...)"
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_parses_with_the_cli_parser(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything relative a logger or callback might create stays here
    config = fit(completing_stack(path))
    assert config.model.family and len(config.data.tasks) > 0
    if path.parent.name == "configs" and "data" in yaml.safe_load(path.read_text()):
        raw = yaml.safe_load(path.read_text())
        assert config.model.family == raw["model"]["family"]
        assert [t.name for t in config.data.tasks] == [t["name"] for t in raw["data"]["tasks"]]
    if config.model.pretrained:
        return  # a hub checkpoint: parsing is all we can do offline
    init = _parser().instantiate_classes(_fit(tuple(completing_stack(path)))).fit
    assert isinstance(init.model, MLLMModule) and isinstance(init.data, TaskStream)
    assert isinstance(init.model.recipe, Recipe)
    assert [t.name for t in init.data.tasks] == [t.name for t in config.data.tasks]


STACKED = [p for p in CONFIGS if declared_stack(p)]


@pytest.mark.parametrize("path", STACKED, ids=[str(p.relative_to(ROOT / "configs")) for p in STACKED])
def test_one_command_config_is_its_declared_stack(path):
    """A top-level paper config (or a paper/ base) parses exactly like the pieces it names."""
    alone, stacked = fit([path]).as_dict(), fit(declared_stack(path)).as_dict()
    alone.pop("config"), stacked.pop("config")
    assert alone == stacked, f"{path.name} and its '# Stack:' line disagree; regenerate it from the pieces"


def test_every_paper_config_is_a_stack_and_the_near_copies_are_gone():
    papers = [p for p in TOP if yaml.safe_load(p.read_text()).get("config")]
    assert len(papers) >= 25  # LLaVA-1.5 and Qwen2.5-VL x 12 methods, OneVision, Li et al.
    for path in papers:
        body = [x for x in path.read_text().splitlines() if x.strip() and not x.startswith("#")]
        assert len(body) <= 12, f"{path.name}: a paper config holds only its method's keys"
        assert f"python -m mllm_cl plan --config configs/{path.name}" in path.read_text()


def test_every_stream_model_method_combination_parses_fast_subset():
    """Each piece in at least one full stack (the whole product: the slow test below)."""
    stacks = [[s, LLAVA, SAPROJ] for s in STREAMS] + [[LMM_CL, m, SAPROJ] for m in MODELS]
    stacks += [[LMM_CL, LLAVA, m] for m in METHODS]
    for stack in stacks:
        assert len(fit(stack).data.tasks) > 0, stack


@pytest.mark.slow
def test_every_stream_model_method_combination_parses():
    for stream, model, method in itertools.product(STREAMS, MODELS, METHODS):
        config = fit([stream, model, method])
        assert config.model.recipe is not None and config.data.tasks, (stream, model, method)


def test_lmm_cl_stream_uses_the_presets_and_leaves_only_five_training_files():
    config = fit([LMM_CL, LLAVA, SAPROJ])
    tasks = config.data.tasks
    assert [t.name for t in tasks] == PRESETS_TASKS
    for t in tasks:
        assert t.eval.class_path.endswith("Benchmark") and t.eval.init_args.name == t.name
        assert t.metric is None  # the preset's metric (multiple_choice A-H would cap CUB's 26 options)
        assert t.train.class_path.endswith("LlavaJson") and t.train.init_args.path.startswith("/path/to/")
    held = config.data.heldout
    assert {h.name for h in held} == PRESETS_HELDOUT and len(held) == 9
    assert all(h.data.class_path.endswith("Benchmark") and h.data.init_args.name == h.name for h in held)
    assert LMM_CL.read_text().count("path: /path/to/") == 5


# Global batch (micro-batch x accumulation x 1 GPU) of LMM_CL's runs: 16 for Full / LLM / MLP /
# Projector and the baselines on MLP, 32 otherwise (issue 11, from LMM_CL's scripts); Li et al.: 16.
GLOBAL_BATCH = {"full": 16, "llm": 16, "mlp": 16, "projector": 16, "lwf": 16, "wiseft": 16, "lora": 16,
                "saproj": 32, "gateup": 32, "vision": 32, "replay": 32, "hybrid": 32,
                "li_llm": 16, "li_hybrid_r0.1": 16, "li_hybrid_r0.2": 16, "li_hybrid_r0.5": 16}  # fmt: skip


@pytest.mark.parametrize("path", [p for p in TOP if declared_stack(p)], ids=lambda p: p.name)
def test_paper_configs_keep_the_papers_global_batch(path):
    config = fit([path])
    method = declared_stack(path)[-1].stem
    assert config.data.batch_size * config.trainer.accumulate_grad_batches == GLOBAL_BATCH[method]


def test_lmm_cl_baselines_run_on_the_mlp_recipe():
    for name in ("lwf", "wiseft", "lora"):
        config = fit([LMM_CL, LLAVA, ROOT / "configs" / "method" / f"{name}.yaml"])
        assert config.model.recipe.class_path.endswith(".MLP"), name
    lora = fit([LMM_CL, LLAVA, ROOT / "configs" / "method" / "lora.yaml"]).model
    assert lora.strategies[0].init_args.dropout == 0.05 and lora.strategies[0].init_args.r == 256
    assert lora.strategies[0].init_args.patterns is None  # LoRA on the recipe's (MLP's) linears
    assert lora.lr == 5e-5
    wise = fit([LMM_CL, LLAVA, ROOT / "configs" / "method" / "wiseft.yaml"]).model.strategies
    # LMM_CL merges 0.1 x previous + 0.9 x fine-tuned: α 0.9 in our convention (1 = fine-tuned).
    assert [c.init_args.alpha for c in wise if c.class_path.endswith("WiSEFT")] == [0.9]


def test_li_et_al_setting():
    li = ROOT / "configs" / "stream" / "li_imagenet.yaml"
    qwen = ROOT / "configs" / "model" / "qwen2.5-vl-7b.yaml"
    for r in (0.1, 0.2, 0.5):
        method = ROOT / "configs" / "method" / f"li_hybrid_r{r}.yaml"
        config = fit([li, qwen, *OVERLAYS, method])
        assert config.model.strategies[0].init_args.ratios == [r]
    config = fit([li, qwen, *OVERLAYS, ROOT / "configs" / "method" / "li_llm.yaml"])
    assert (config.model.lr, config.model.warmup_ratio) == (1e-6, 0.1)
    assert config.model.recipe.class_path.endswith(".LLM")
    assert config.model.family_options["processor_kwargs"]["max_pixels"] == 262_144
    quadrants = {(h.image_domain, h.text_domain) for h in config.data.heldout}
    assert {("ood", "id"), ("id", "ood")} <= quadrants


def test_qwen_configs_cap_images_so_samples_fit_max_length():
    """Qwen2.5-VL: one image token per 28x28 pixels; the longest LMM_CL prompt is ~300 text tokens."""
    for path in TOP:
        config = fit([path]) if declared_stack(path) else None
        if config is None or config.model.family != "qwen2_5_vl":
            continue
        max_pixels = config.model.family_options["processor_kwargs"]["max_pixels"]
        assert max_pixels // (28 * 28) + 300 <= config.data.max_length, path.name


def write_config(tmp_path, edit) -> str:
    config = yaml.safe_load(TINY.read_text())
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_unknown_class_path_exits_naming_it(tmp_path, capsys):
    path = write_config(tmp_path, lambda c: c["model"].update(recipe={"class_path": "NoSuchRecipe"}))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", path, "--trainer.default_root_dir", str(tmp_path)])
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "NoSuchRecipe" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_recipe_matching_nothing_exits_with_one_error_line(tmp_path, capsys):
    args = [
        "fit",
        "--config",
        str(TINY),
        "--model.recipe",
        "Patterns",
        "--model.recipe.patterns",
        '["^nothing"]',
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "Patterns" in errors[0] and "^nothing" in errors[0] and "Traceback" not in errors[0]
