"""Transformer Engine STAND-IN (tests only): the `transformer_engine.pytorch` names moeforge uses."""

from .module import GroupedLinear, Linear
from .quantization import autocast, fp8_autocast

__all__ = ["Linear", "GroupedLinear", "autocast", "fp8_autocast"]
