"""Typed configuration: dataclasses are the schema, Hydra only composes YAML onto them.

The root dataclass is registered in Hydra's ConfigStore as `moeforge_schema` and listed first
in conf/config.yaml's defaults, so every group file merges onto a typed node: an unknown key
or a value of the wrong type fails composition. `load_config` turns Hydra/OmegaConf errors
into a one-line `ConfigError` naming the key, and converts the result into dataclasses that
each component receives separately (no monolithic config passed everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import ConfigError, ModelConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)


def register_schemas() -> None:
    ConfigStore.instance().store(name="moeforge_schema", node=Config)


register_schemas()


def format_config_error(exc: BaseException) -> str:
    """One line naming the key at fault, from a Hydra or OmegaConf exception chain."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            key = getattr(seen, "full_key", None)
            msg = str(getattr(seen, "msg", None) or seen).strip().splitlines()[0]
            return f"{key}: {msg}" if key else msg
        seen = seen.__cause__ or seen.__context__
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose conf/ with Hydra's compose API (tests, tools); raise ConfigError on a bad key or type."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(format_config_error(exc)) from None


def model_config(node: DictConfig) -> ModelConfig:
    """The typed, validated ModelConfig of a composed `model` node."""
    known = {f.name for f in fields(ModelConfig)}
    for key in node:  # `+model.key=…` overrides bypass the schema's struct flag
        if key not in known:
            raise ConfigError(f"model.{key}: unknown model config key")
    try:
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise ConfigError(format_config_error(exc)) from None
    if not isinstance(cfg, ModelConfig):  # a plain dict when the node lost its schema
        cfg = ModelConfig.from_dict(dict(cfg))
    return cfg.validate()
