"""Continual-learning strategies, nameable in YAML by class path or short name.

Importing this package registers every strategy with jsonargparse / LightningCLI, so a config can
say ``class_path: strategies.freeze.SAProj`` or just ``class_path: SAProj``.
"""

from strategies.base import Strategy
from strategies.freeze import LLM, MLP, Full, MLPGateUp, Patterns, Projector, Recipe, SAProj, VisionEncoder

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
    "Patterns",
]
