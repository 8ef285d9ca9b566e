"""Continual-learning strategies, nameable in YAML by class path or short name.

Importing this package registers every strategy with jsonargparse / LightningCLI, so a config can
say ``class_path: strategies.freeze.SAProj`` or just ``class_path: SAProj``.
"""

from strategies.base import Strategy
from strategies.freeze import (
    LLM,
    MLP,
    SAQKV,
    SAVO,
    Full,
    LastLayers,
    MLPDown,
    MLPGateUp,
    Patterns,
    Projector,
    Recipe,
    SAProj,
    SAProjGateUp,
    VisionEncoder,
)
from strategies.hybrid import DataHybrid
from strategies.l2_anchor import L2Anchor
from strategies.lora import LoRA
from strategies.lwf import LwF
from strategies.replay import Replay
from strategies.wise_ft import WiSEFT

__all__ = [
    "Strategy",
    "Recipe",
    "Full",
    "VisionEncoder",
    "Projector",
    "LLM",
    "SAProj",
    "MLP",
    "MLPGateUp",
    "SAQKV",
    "SAVO",
    "MLPDown",
    "SAProjGateUp",
    "LastLayers",
    "Patterns",
    "LwF",
    "DataHybrid",
    "Replay",
    "WiSEFT",
    "LoRA",
    "L2Anchor",
]
