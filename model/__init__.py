"""DeepSeek-V3-family model in single-device PyTorch."""

from .config import ConfigError, ModelConfig
from .flops import flops_per_token, param_counts
from .moe import MoE, load_stats, moe_layers, update_expert_bias
from .transformer import Losses, Transformer

__all__ = ["ConfigError", "ModelConfig", "Transformer", "Losses", "MoE", "moe_layers",
           "update_expert_bias", "load_stats", "flops_per_token", "param_counts"]
