"""Model configuration: DeepSeek's reference names (inference/model.py `ModelArgs`), validated.

The dataclass is the schema; Hydra composes the YAML presets under conf/model/ onto it
(train/config.py registers it in the ConfigStore), and `validate()` checks the relations
between fields that a type system cannot express.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from data.errors import UserError


class ConfigError(UserError):
    """A user's configuration mistake. Its message is one line naming the key at fault."""


class Choice(str, Enum):
    """A closed set of strings for a config field: the schema (OmegaConf) rejects any other value.

    Each member is its string: it compares, hashes, prints, formats and serialises (json,
    wandb) as its value, so code compares fields with plain strings ("sigmoid") and a config
    round-tripped through JSON equals the original. OmegaConf looks values up by member name,
    so every name must equal its value (tests/unit/test_config.py checks).
    """

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class ScoreFunc(Choice):
    softmax = "softmax"  # DeepSeek-V2
    sigmoid = "sigmoid"  # DeepSeek-V3


@dataclass
class ModelConfig:
    """DeepSeek-V3-family transformer. Field names follow DeepSeek's reference `ModelArgs`."""

    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944  # hidden size of the dense SwiGLU layers
    moe_inter_dim: int = 1408  # hidden size of one routed (and one shared) expert
    n_layers: int = 27
    n_dense_layers: int = 1  # the first n_dense_layers use a dense MLP instead of MoE
    n_heads: int = 16
    # MoE
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: ScoreFunc = ScoreFunc.softmax
    route_scale: float = 1.0
    # MLA
    q_lora_rank: int = 0  # 0 = no query compression (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # YaRN (active when max_seq_len > original_seq_len)
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # multi-token prediction
    n_mtp_layers: int = 0
    max_seq_len: int = 4096
    init_std: float = 0.006
    norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers if self.n_routed_experts > 0 else 0

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layer ids >= n_layers are MTP blocks; like the released V3 checkpoint they are MoE."""
        return self.n_routed_experts > 0 and layer_id >= self.n_dense_layers

    def validate(self) -> "ModelConfig":
        """Check relations between fields; raise ConfigError naming the first field at fault."""

        def fail(field: str, msg: str) -> None:
            raise ConfigError(f"model.{field}={getattr(self, field)!r}: {msg}")

        positive = ["vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_rope_head_dim",
                    "v_head_dim", "max_seq_len", "original_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                fail(name, "must be > 0")
        non_negative = ["n_dense_layers", "q_lora_rank", "qk_nope_head_dim", "n_routed_experts",
                        "n_shared_experts", "n_mtp_layers"]
        for name in non_negative:
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.n_dense_layers > self.n_layers:
            fail("n_dense_layers", f"exceeds n_layers={self.n_layers}")
        if self.n_dense_layers > 0 and self.inter_dim <= 0:
            fail("inter_dim", "must be > 0 when there are dense layers")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)")
        if self.score_func not in list(ScoreFunc):  # from_dict and direct construction bypass the schema
            fail("score_func", f"must be one of {', '.join(ScoreFunc)}")
        if self.n_routed_experts > 0:
            if self.moe_inter_dim <= 0:
                fail("moe_inter_dim", "must be > 0 with routed experts")
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                fail("n_activated_experts", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
            if self.n_expert_groups < 1:
                fail("n_expert_groups", "must be >= 1")
            if self.n_routed_experts % self.n_expert_groups:
                fail("n_routed_experts", f"not divisible by n_expert_groups={self.n_expert_groups}")
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                fail("n_limited_groups", f"must be in [1, n_expert_groups={self.n_expert_groups}]")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_expert_groups > 1 and per_group < 2 and self.score_func == "sigmoid":
                # softmax (V2) groups score their best expert, so a group may hold one expert
                fail("n_expert_groups", "sigmoid group-limited routing scores each group by its top-2 "
                                        "experts: need at least 2 experts per group")
            if self.n_activated_experts > self.n_limited_groups * per_group:
                fail("n_activated_experts", f"exceeds the {self.n_limited_groups * per_group} experts "
                                            "in the n_limited_groups kept groups")
            if self.route_scale <= 0:
                fail("route_scale", "must be > 0")
        elif self.n_dense_layers != self.n_layers:
            fail("n_routed_experts", "is 0 but n_dense_layers < n_layers: MoE layers need experts")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be > 0")
        if self.max_seq_len > self.original_seq_len and self.rope_factor < 1:
            fail("rope_factor", "YaRN needs rope_factor >= 1")
        if self.init_std <= 0:
            fail("init_std", "must be > 0")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a plain mapping; an unknown key is a ConfigError naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ConfigError(f"model.{key}: unknown model config key")
        return cls(**d).validate()
