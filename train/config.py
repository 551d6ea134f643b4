"""Typed configuration: dataclasses are the schema, Hydra only composes YAML onto them.

The root dataclass is registered in Hydra's ConfigStore as `moeforge_schema` and listed first
in conf/config.yaml's defaults, so every group file merges onto a typed node: an unknown key
or a value of the wrong type fails composition. Closed sets of strings are `Choice` enums, so
the schema also rejects a value outside the set, while YAML and overrides keep plain spellings.
`compose` and `to_config` turn Hydra/OmegaConf errors into a one-line `ConfigError` naming the
key (`fp8.backend='x': must be one of off, te, torch, emulated`), and `to_config` converts the
result into dataclasses that each component receives separately (no monolithic config passed
everywhere).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import Choice, ConfigError, ModelConfig

from .cluster import ClusterConfig
from .log import LoggingConfig
from .schedule import OptimConfig, ScheduleConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class OnExhausted(Choice):
    """What a mixture source does at its `epochs` cap (data/mixture.py)."""

    next_epoch = "next_epoch"  # continue into its next epoch (the cap is logged)
    stop = "stop"  # the mixture ends at the last whole global batch before it
    drop = "drop"  # the source leaves the mixture; the rest are renormalised


@dataclass
class SourceConfig:
    """One prepared dataset of a weighted mixture (`data.sources`; docs/data.md "Mixtures")."""

    path: str = ""
    weight: float = 1.0  # relative share of sequences (>= 0; 0 = never drawn)
    name: str = ""  # "" = the folder's basename (made unique); names the metrics tokens/<name>, val_loss/<name>
    epochs: float = 0.0  # cap in epochs of this source; 0 = none
    on_exhausted: OnExhausted = OnExhausted.next_epoch


@dataclass
class DataConfig:
    """Where tokens come from. `path` is a `data.prepare` output folder (train/ and val/ shard sets);
    `sources` a weighted mixture of such folders (data/mixture.py); set one of the two."""

    path: str = ""
    sources: list[SourceConfig] = field(default_factory=list)
    # When set and `path` holds no prepared dataset: prepare this input (e.g. "stdlib") with
    # `tokenizer` first, once, into `path` (or a cache folder when `path` is empty). Not read with `sources`.
    prepare_input: str = ""
    tokenizer: str = "byte"
    num_workers: int = 1  # background readers; the order of sequences does not depend on it
    document_aware: bool = False  # position ids restart per document; labels never cross one

    def validate(self) -> "DataConfig":
        """One-line ConfigError for what the types cannot say about a mixture (data/mixture.py checks the rest)."""
        if self.sources and self.path:
            raise ConfigError(f"data.path={self.path!r} and data.sources: set one (data.path is the one-source "
                              "shorthand of data.sources)")
        if self.sources:
            from data.errors import DataError
            from data.mixture import check_sources

            try:
                check_sources(self.sources)
            except DataError as exc:
                raise ConfigError(str(exc)) from None
        return self


class Partition(Choice):
    """How pipeline stages are balanced (parallel/pipeline.py `layer_costs`)."""

    parameters = "parameters"
    flops = "flops"  # training FLOPs per token
    uniform = "uniform"  # the same number of blocks


@dataclass
class ParallelConfig:
    """Layout: world = pp × dp; expert parallelism (ep) lives inside dp."""

    pp: int = 1
    ep: int = 1
    zero_stage: int = 1  # 0, 1 or 2 (pipelines allow 0 or 1)
    partition: Partition = Partition.parameters
    layer_costs: list[float] = field(default_factory=list)  # [embedding, block 0..L-1, output]; overrides partition
    activation_checkpoint_interval: int = 0  # pipelines: recompute every k blocks in backward; 0 = off
    # DeepSpeed settings merged into the generated DeepSpeed config (parallel/engine.py), checked
    # against DeepSpeed's schema and against the keys moeforge sets itself (DEEPSPEED_OWNED).
    deepspeed: dict = field(default_factory=dict)
    # Expert-parallel dispatch (parallel/expert.py; docs/parallel.md "Dispatch paths"):
    ep_ranks_per_node: int = 0  # ep ranks per node for node-aware dispatch; 0 = from the launch (LOCAL_WORLD_SIZE)
    moe_overlap: bool = False  # asynchronous all-to-all; shared experts computed while the dispatch is in flight
    moe_chunks: int = 1  # 2 = a layer's tokens in two halves, one half's exchange behind the other's experts (1 = off)
    fp8_dispatch: bool = True  # FP8 experts with 1×128-tile or row scales: dispatched rows travel as E4M3


class SpikeAction(Choice):
    off = "off"
    skip = "skip"  # drop the update
    rollback = "rollback"  # reload the last checkpoint, skip its data since


@dataclass
class SpikeConfig:
    """Loss-spike detector (train/faults.py): loss > mean + max(k·std, min_rise·mean) of the last window."""

    action: SpikeAction = SpikeAction.skip
    window: int = 100  # accepted losses the mean and spread are taken over
    k: float = 6.0  # standard deviations above the mean
    min_rise: float = 0.1  # and at least this fraction of the mean above it
    warmup: int = 100  # losses seen before the detector acts


class Device(Choice):
    auto = "auto"  # cuda when visible, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Dtype(Choice):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class Attention(Choice):
    """How document masks are computed (model/attention.py); plain causal runs take SDPA's causal path."""

    sdpa = "sdpa"  # a dense (T × T) mask, every device
    flex = "flex"  # torch flex attention with a block mask (CUDA: no CPU backward)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 100  # 0 = never
    eval_batches: int = 8  # validation micro-batches per rank per evaluation
    global_batch_size: int = 32  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per rank per forward
    seq_len: int = 256
    device: Device = Device.auto
    dtype: Dtype = Dtype.auto
    compile: bool = False  # torch.compile each transformer block
    attention: Attention = Attention.sdpa  # document-mask backend when data.document_aware
    deterministic: bool = False  # deterministic algorithms (parity tests)
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight α (DeepSeek-V3 §2.1.2)
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    max_skipped: int = 10  # consecutive skipped updates (non-finite values, loss spikes) before the run stops
    # Python's cyclic garbage collector runs every this many steps on every rank, not at random
    # (train/garbage.py, as torchtitan's gc_freq); 0 = Python's automatic collection.
    gc_interval: int = 50
    # Seconds for the process group and DeepSpeed's comm backend to come up before the run ends
    # with one line naming what it waits for and exit 5 (parallel/startup.py); 0 = wait forever.
    startup_timeout_s: int = 600
    spike: SpikeConfig = field(default_factory=SpikeConfig)


class Fp8Backend(Choice):
    off = "off"
    te = "te"  # Transformer Engine
    torch = "torch"  # torch._scaled_mm
    emulated = "emulated"  # quantise → dequantise in PyTorch, any device


class Fp8Recipe(Choice):
    auto = "auto"  # the backend's default: blockwise (te, emulated), rowwise (torch)
    blockwise = "blockwise"
    tensorwise = "tensorwise"
    rowwise = "rowwise"
    current = "current"
    delayed = "delayed"
    mxfp8 = "mxfp8"
    grad_blocks = "grad_blocks"  # emulated negative controls (bench/fp8_band.py)
    e5m2_forward = "e5m2_forward"
    amax_floor = "amax_floor"


FP8_RECIPES = {"te": ("blockwise", "current", "delayed", "mxfp8"), "torch": ("tensorwise", "rowwise"),
               "emulated": ("blockwise", "tensorwise", "rowwise", "grad_blocks", "e5m2_forward", "amax_floor")}  # the last three: negative controls


@dataclass
class Fp8Config:
    """FP8 GEMMs of the model's projections (docs/fp8.md)."""

    backend: Fp8Backend = Fp8Backend.off
    recipe: Fp8Recipe = Fp8Recipe.auto  # per backend (FP8_RECIPES); auto = te/emulated blockwise, torch rowwise
    block_size: int = 128  # emulated blockwise tile / block edge (DeepSeek-V3: 128)
    pow2_scales: bool = False  # round scales up to powers of two (TE's blocks, DeepSeek V3.1 ue8m0)
    exclude: list[str] = field(default_factory=list)  # linear names kept high precision (fnmatch: "attn.*")
    # MTP's eh_proj in FP8: DeepSeek-V3's released checkpoint keeps it in BF16 (it is not among
    # the FP8-quantised weights of layer 61), so it stays high precision unless asked for.
    mtp_eh_proj: bool = False

    def resolved_recipe(self) -> str:
        if self.recipe == "auto":
            return "rowwise" if self.backend == "torch" else "blockwise"
        return str(self.recipe)

    def validate(self) -> "Fp8Config":
        if self.backend != "off" and self.resolved_recipe() not in FP8_RECIPES[self.backend]:
            raise ConfigError(f"fp8.recipe={self.recipe!r}: fp8.backend={self.backend} offers "
                              f"{', '.join(FP8_RECIPES[self.backend])}")
        if self.block_size < 1:
            raise ConfigError(f"fp8.block_size={self.block_size}: must be >= 1")
        return self

    def precision(self):
        from model.linear import Precision

        exclude = tuple(self.exclude) + (() if self.mtp_eh_proj else ("mtp.eh_proj",))
        return Precision(self.backend, self.resolved_recipe(), self.block_size, self.pow2_scales, exclude)


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" = <run dir>/checkpoints
    interval: int = 0  # steps between saves; 0 = by wall time only (interval_minutes)
    interval_minutes: float = 30.0  # wall time between saves, agreed across ranks; 0 = by steps only
    keep: int = 3  # complete checkpoints kept (the newest is never deleted)
    resume: str = "auto"  # auto (newest verified in dir, else start fresh) | never | <checkpoint path>
    # With nothing to resume: start from these weights only (fresh optimizer, data position and step):
    # a Hugging Face folder (config.json + safetensors) or a moeforge checkpoint (or checkpoint dir).
    init_from: str = ""
    reset_optimizer: bool = False  # on resume: fresh Adam moments (weights, step and data position kept)
    reset_data: bool = False  # on resume: the data loader starts over (weights and optimizer kept)
    save_at_end: bool = True  # save after the last step
    async_save: bool = False  # write in a background thread after a host snapshot (YAML cannot say `async`)


@dataclass
class RunConfig:
    """What makes launches of the same command one run (train/run.py)."""

    name: str = ""  # "" = the experiment's name, else the model preset's; the run directory is runs/<name>


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # the planner's hardware (train/cluster.py)


def register_schemas() -> None:
    ConfigStore.instance().store(name="moeforge_schema", node=Config)


register_schemas()


def choice_type(key: str) -> type[Choice] | None:
    """The `Choice` enum of a dotted schema key ("fp8.backend"), or None when it has none."""
    node: object = Config
    for name in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(name)
    return node if isinstance(node, type) and issubclass(node, Choice) else None


def _list_item_path(schema: type, prefix: str = "") -> dict[type, str]:
    """Dataclasses that live in list fields of the schema → their path ("data.sources[]"): OmegaConf
    names a bad field of a list item by its own name only."""
    out: dict[type, str] = {}
    for name, hint in typing.get_type_hints(schema).items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            out[args[0]] = f"{prefix}{name}[]"
        elif dataclasses.is_dataclass(hint):
            out.update(_list_item_path(hint, f"{prefix}{name}."))
    return out


def format_config_error(exc: BaseException) -> str:
    """One line naming the key at fault, from a Hydra or OmegaConf exception chain."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")  # `model=nonexistent`
        return f"{group}={option}: no such option; available: {', '.join(exc.options)}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if first.startswith("Ambiguous value for argument"):  # `optim.lr=1e-3,3e-3` without -m
        arg = first.split("'", 1)[-1].rstrip("'")
        return (f"{arg}: a comma list is a sweep; add -m (--multirun) to run each value, or write "
                "[a,b] for a list, 'a,b' for a string")
    seen = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            key = getattr(seen, "full_key", None)
            item = _list_item_path(Config).get(getattr(seen, "object_type", None))
            if key and item and "." not in key:  # a field of a list item (data.sources[].on_exhausted)
                hint = typing.get_type_hints(seen.object_type).get(key)
                if isinstance(hint, type) and issubclass(hint, Choice):
                    return f"{item}.{key}={seen.value!r}: must be one of {', '.join(hint)}"
                key = f"{item}.{key}"
            choice = choice_type(key) if key else None
            if choice is not None:
                return f"{key}={seen.value!r}: must be one of {', '.join(choice)}"
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


def to_config(cfg: DictConfig) -> Config:
    """The composed DictConfig as typed dataclasses, validated (ConfigError names the key)."""
    known = {f.name for f in fields(Config)}
    for key in cfg:
        if key not in known and key != "hydra":
            raise ConfigError(f"{key}: unknown config group or key")
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(format_config_error(exc)) from None
    typed.model = model_config(cfg.model)
    return validate(typed)


def validate(cfg: Config) -> Config:
    """Relations between groups that types cannot express. Runs before any process group."""
    t, p = cfg.trainer, cfg.parallel
    cfg.optim.validate()
    cfg.schedule.validate()
    cfg.data.validate()
    cfg.logging.validate()
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "seq_len", "log_interval"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"trainer.{name}={getattr(t, name)}: must be > 0")
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"trainer.seq_len={t.seq_len}: exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if p.pp < 1 or p.ep < 1:
        raise ConfigError(f"parallel.pp={p.pp}, parallel.ep={p.ep}: must be >= 1")
    if p.zero_stage not in (0, 1, 2):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: must be 0, 1 or 2 (ZeRO-3 is not supported)")
    c = cfg.checkpoint
    if c.interval < 0:
        raise ConfigError(f"checkpoint.interval={c.interval}: must be >= 0 (0 = by wall time only)")
    if c.interval_minutes < 0:
        raise ConfigError(f"checkpoint.interval_minutes={c.interval_minutes}: must be >= 0 (0 = by steps only)")
    if t.spike.action == "rollback" and not (c.interval or c.interval_minutes):
        raise ConfigError("trainer.spike.action=rollback: needs periodic checkpoints to roll back to "
                          "(checkpoint.interval or checkpoint.interval_minutes > 0)")
    if c.keep < 1:
        raise ConfigError(f"checkpoint.keep={c.keep}: must be >= 1")
    sp = t.spike
    if sp.window < 2 or sp.warmup < 0 or sp.k <= 0 or sp.min_rise < 0:
        raise ConfigError(f"trainer.spike: window={sp.window} (>= 2), warmup={sp.warmup} (>= 0), k={sp.k} (> 0), "
                          f"min_rise={sp.min_rise} (>= 0)")
    if t.startup_timeout_s < 0:
        raise ConfigError(f"trainer.startup_timeout_s={t.startup_timeout_s}: must be >= 0 (0 = no startup watchdog)")
    if t.max_skipped < 1:
        raise ConfigError(f"trainer.max_skipped={t.max_skipped}: must be >= 1")
    if t.gc_interval < 0:
        raise ConfigError(f"trainer.gc_interval={t.gc_interval}: must be >= 0 (0 = Python's automatic collection)")
    if t.attention == "flex" and cfg.data.document_aware:
        import torch

        if t.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("trainer.attention=flex: needs a CUDA device (torch's flex attention has no CPU "
                              "backward); use trainer.attention=sdpa")
    cfg.fp8.validate()
    from parallel.ds_config import check_deepspeed

    check_deepspeed(cfg)
    return cfg


def check_layout(cfg: Config, world_size: int) -> int:
    """Validate the parallel layout against the world size; return dp. Before any process group."""
    from parallel.topology import Layout

    t, p = cfg.trainer, cfg.parallel
    layout = Layout(world_size, p.pp, p.ep).check(cfg.model, p.zero_stage)
    dp = layout.dp
    if p.layer_costs and len(p.layer_costs) != cfg.model.n_layers + 2:
        raise ConfigError(f"parallel.layer_costs: {len(p.layer_costs)} values; need model.n_layers + 2 = "
                          f"{cfg.model.n_layers + 2} (embedding, each block, output)")
    if p.activation_checkpoint_interval < 0:
        raise ConfigError(f"parallel.activation_checkpoint_interval={p.activation_checkpoint_interval}: must be >= 0")
    if p.activation_checkpoint_interval and p.pp == 1:
        raise ConfigError("parallel.activation_checkpoint_interval: activation checkpointing runs through "
                          "DeepSpeed's pipeline module; set parallel.pp >= 2 or leave it at 0")
    if p.ep_ranks_per_node < 0 or (p.ep_ranks_per_node and p.ep % p.ep_ranks_per_node):
        raise ConfigError(f"parallel.ep_ranks_per_node={p.ep_ranks_per_node}: must divide parallel.ep={p.ep} "
                          "(0 = from the launch)")
    if p.moe_chunks < 1:
        raise ConfigError(f"parallel.moe_chunks={p.moe_chunks}: must be >= 1 (1 = off)")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"trainer.global_batch_size={t.global_batch_size}: not divisible by "
                          f"trainer.micro_batch_size={t.micro_batch_size} × dp={dp}")
    return dp


def check_fp8(cfg: Config) -> None:
    """FP8 backend against this machine and model (ConfigError naming what cannot run and what would)."""
    if cfg.fp8.backend == "off":
        return
    from model.fp8 import check_capability
    from parallel.engine import resolve_device

    device = resolve_device(cfg.trainer.device)
    check_capability(cfg.fp8.precision(), device, cfg.model)


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
