"""Freezing recipes: which parameters a stage trains.

From Zhu et al. 2025, "How to Teach Large Multimodal Models New Skills" (LMM_CL): tuning only the
LLM's self-attention projections (SA Proj: q, k, v, o) learns +24.9 with -0.6 held-out change; MLP
Gate&Up (down_proj frozen) +30.5 / -2.1; the full LLM +31.8 / -23.3.

Conventions: everything is frozen first, then parameters whose *canonical name* matches one of the
recipe's regexes are unfrozen. Canonical names are ``vision.*``, ``projector.*`` and ``llm.*``
(``llm`` = language model + ``lm_head``; see `mllm_cl.families`), so LLM recipes never match vision
blocks that reuse the same module names (Qwen2.5-VL's ``visual.blocks.N.mlp.gate_proj``, CLIP's
``self_attn.q_proj``), and Qwen2.5-VL's ``visual.merger`` counts as the projector. Applying a recipe
twice gives the same trainable set; a recipe that matches nothing is an error.
"""

from __future__ import annotations

import re

from mllm_cl.errors import ConfigError
from strategies.base import Strategy

_LAYERS = r"^llm\.layers\.\d+\."


class Recipe(Strategy):
    """Train the parameters whose canonical name matches any regex in `patterns`.

    Args:
        patterns: regexes searched in canonical names (``llm.layers.3.self_attn.q_proj.weight``).
        exclude: regexes of parameters kept frozen even when `patterns` match them.
    """

    patterns: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __init__(self, patterns: list[str] | None = None, exclude: list[str] | None = None):
        if patterns is not None:
            self.patterns = tuple(patterns)
        if exclude is not None:
            self.exclude = tuple(exclude)

    def selects(self, canonical: str) -> bool:
        return any(re.search(p, canonical) for p in self.patterns) and not any(
            re.search(p, canonical) for p in self.exclude
        )

    def resolve(self, canonical_names) -> None:
        """Fix patterns that depend on the model (see `LastLayers`); called before any `selects`."""

    def setup(self, ctx) -> None:
        names = ctx.canonical_names()
        self.resolve(names.values())
        trainable = 0
        for real, param in ctx.model.named_parameters():
            on = self.selects(names[real])
            param.requires_grad_(on)
            trainable += on
        if trainable == 0:
            raise ConfigError(
                f"model.recipe {type(self).__name__} (patterns {list(self.patterns)}) matches no parameter of "
                f"{ctx.family.name}; canonical names look like {next(iter(names.values()))!r}"
            )


class Full(Recipe):
    """Every parameter: vision tower, projector and LLM."""

    patterns = (r".",)


class VisionEncoder(Recipe):
    """The vision tower only (Qwen2.5-VL's merger excluded: it is the projector)."""

    patterns = (r"^vision\.",)


class Projector(Recipe):
    """The vision-language projector only (`multi_modal_projector` / `visual.merger`)."""

    patterns = (r"^projector\.",)


class LLM(Recipe):
    """The whole language model: embeddings, decoder layers, norms and lm_head."""

    patterns = (r"^llm\.",)


class SAProj(Recipe):
    """The LLM's self-attention projections q, k, v, o (biases included when present)."""

    patterns = (_LAYERS + r"self_attn\.(q|k|v|o)_proj\.",)


class MLP(Recipe):
    """The LLM's MLP: gate, up and down projections."""

    patterns = (_LAYERS + r"mlp\.(gate|up|down)_proj\.",)


class MLPGateUp(Recipe):
    """The LLM's MLP gate and up projections; down_proj stays frozen."""

    patterns = (_LAYERS + r"mlp\.(gate|up)_proj\.",)


# LMM_CL's ablations of the tuned part (Zhu et al. 2025): named so a config says what it trains.
class SAQKV(Recipe):
    """The LLM's q, k, v projections; o_proj stays frozen (LMM_CL's "self_attn_proj_wo_o_proj")."""

    patterns = (_LAYERS + r"self_attn\.(q|k|v)_proj\.",)


class SAVO(Recipe):
    """The LLM's v and o projections only."""

    patterns = (_LAYERS + r"self_attn\.(v|o)_proj\.",)


class MLPDown(Recipe):
    """The LLM's MLP down projection only; gate and up stay frozen."""

    patterns = (_LAYERS + r"mlp\.down_proj\.",)


class SAProjGateUp(Recipe):
    """SA Proj (q, k, v, o) and MLP gate and up together; down_proj stays frozen."""

    patterns = (*SAProj.patterns, *MLPGateUp.patterns)


class LastLayers(Recipe):
    """The last `n` decoder layers of the LLM (every parameter in them, or those matching `within`).

    Args:
        n: how many of the last decoder layers train.
        within: optional regex for the part of each layer that trains, after ``llm.layers.N.``
            (e.g. ``self_attn\\.`` or ``mlp\\.(gate|up)_proj\\.``); default: the whole layer.
    """

    def __init__(self, n: int, within: str | None = None):
        super().__init__()
        if n < 1:
            raise ConfigError(f"LastLayers(n={n}): n must be >= 1")
        self.n, self.within = n, within or ""

    def resolve(self, canonical_names) -> None:
        found = {re.match(r"^llm\.layers\.(\d+)\.", c) for c in canonical_names}
        layers = sorted({int(m.group(1)) for m in found if m})
        if self.n > len(layers):
            raise ConfigError(f"LastLayers(n={self.n}): the model has {len(layers)} decoder layers")
        keep = "|".join(str(i) for i in layers[-self.n :])
        self.patterns = (rf"^llm\.layers\.({keep})\.{self.within}",)


class Patterns(Recipe):
    """A recipe from your own regexes over canonical names, e.g. ``["^llm\\.layers\\.(2[4-9]|3[01])\\."]``.

    Args:
        patterns: regexes that select trainable parameters.
        exclude: regexes that keep parameters frozen.
    """

    def __init__(self, patterns: list[str], exclude: list[str] | None = None):
        super().__init__(patterns, exclude)
