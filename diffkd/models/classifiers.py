"""Image classifiers by timm name (teacher and student), saved in timm's own layout.

    create_classifier("resnet50", in_chans=1)                    a timm model, trained from scratch
    create_classifier("resnet50", pretrained="weights/r50")      started from weights (see `pretrained_overlay`)
    create_classifier("resnet18", clinical_dim=W)                + clinical fusion head (fusion.py)
    save_classifier(model, dir)  /  load_classifier(dir)

A saved classifier is a folder timm reads by itself::

    model.safetensors   the timm model's state dict
    config.json         timm's config: architecture, num_classes, model_args (in_chans, ...), pretrained_cfg
    fusion_head.safetensors + fusion_head.json    only when the model fuses clinical attributes

so ``cfg = json.load(open("config.json")); m = timm.create_model(cfg["architecture"], **cfg["model_args"]);
m.load_state_dict(safetensors.torch.load_file("model.safetensors"))`` (or
``timm.create_model("local-dir:DIR", pretrained=True)``) restores the image model with no diffkd code.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffkd.data.schema import DEFAULT_LABEL_NAMES, NUM_LABELS, ClinicalEncoding
from diffkd.models import unwrap
from diffkd.models.fusion import ClinicalFusionClassifier, ClinicalFusionHead, FusionHeadConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FUSION_WEIGHTS = "fusion_head.safetensors"
FUSION_CONFIG = "fusion_head.json"
# pretrained_cfg entries timm copies from its ImageNet release of an architecture; untrue of weights trained here.
_IMAGENET_PROVENANCE = ("tag", "license", "origin_url", "paper_ids", "hf_hub_id", "hf_hub_filename", "url",
                        "test_input_size", "test_crop_pct", "pool_size")


SCRATCH = "scratch"  # what `initialised_from` says of a model that started from random weights
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what a timm / Hugging Face folder holds, in order
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HF_HUB = "hf-hub:"


def initialised_from(pretrained: str) -> str:
    """How a model's weights started, for metrics.json and the report: "scratch"; an hf-hub id pinned to
    the revision it resolves to (`resolve_pretrained`); or a local weights file's name and sha256 (not
    its absolute path, which names the user's machine and folders)."""
    if not pretrained:
        return SCRATCH
    if pretrained.startswith(HF_HUB):
        try:
            return resolve_pretrained(pretrained)
        except (OSError, ValueError) as err:
            return f"{pretrained} (revision not resolved: {type(err).__name__})"
    path = os.path.abspath(os.path.expanduser(pretrained))
    weights = path if os.path.isfile(path) else next(
        (os.path.join(path, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        return os.path.basename(path)
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.basename(path)} (sha256 {digest.hexdigest()[:16]})"


@functools.lru_cache(maxsize=None)
def resolve_pretrained(pretrained: str) -> str:
    """An ``hf-hub:org/name[@revision]`` id pinned to a commit: ``hf-hub:org/name@<40-hex sha>``.

    A commit sha given is kept as it is (nothing is asked of the hub); a branch or tag, or no revision,
    is resolved on the hub once per process, so the weights loaded and the revision recorded agree.
    Other sources are returned unchanged."""
    if not pretrained.startswith(HF_HUB):
        return pretrained
    repo, _, revision = pretrained[len(HF_HUB):].partition("@")
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return pretrained
    from huggingface_hub import HfApi

    sha = HfApi().model_info(repo, revision=revision or None).sha
    if not sha:
        raise ValueError(f"the hub gave no commit for {pretrained!r}")
    return f"{HF_HUB}{repo}@{sha}"


def pretrained_overlay(source: str, arch: str) -> dict[str, Any]:
    """timm's `pretrained_cfg_overlay` that loads `source` into architecture `arch`.

    `source` is a local weights file (.safetensors, .pth, .pt, .bin), a local folder holding
    model.safetensors or pytorch_model.bin (+ timm's config.json, whose architecture must be `arch`
    and whose input channels and classes are then known), or ``hf-hub:<org>/<name>`` (Hugging Face hub).
    timm adapts the first convolution to the model's input channels and starts a fresh classifier
    when the class counts differ.
    """
    if source.startswith(HF_HUB):
        return {"hf_hub_id": source[len(HF_HUB):]}  # timm reads a revision after "@"
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isfile(path):
        if not path.endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"pretrained {source!r}: a weights file must end in {', '.join(WEIGHT_SUFFIXES)}")
        return {"file": path}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"pretrained {source!r} is neither a weights file, a folder, nor {HF_HUB}<org>/<name>")
    overlay: dict[str, Any] = {}
    config_path = os.path.join(path, CONFIG)
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        if config.get("architecture") and config["architecture"] != arch:
            raise ValueError(f"pretrained {source!r} holds a {config['architecture']!r} model, but the config asks "
                             f"for arch {arch!r}: set the arch to {config['architecture']!r} or choose other weights")
        saved = config.get("pretrained_cfg") or {}
        if saved.get("input_size"):
            overlay["input_size"] = tuple(saved["input_size"])  # so timm adapts the stem from the right width
        if config.get("num_classes"):
            overlay["num_classes"] = int(config["num_classes"])
    weights = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.exists(os.path.join(path, name))]
    if not weights:
        raise FileNotFoundError(f"pretrained folder {source!r} holds none of {', '.join(WEIGHT_FILES)}")
    return {**overlay, "file": weights[0]}


def _check_loaded(model: nn.Module, weights: str, source: str, arch: str) -> None:
    """timm loads non-strictly once it drops a classifier, so weights of another architecture would half-load
    in silence; every tensor of the model but its classifier must come from the file, by timm's names."""
    from timm.models import load_state_dict

    loaded = load_state_dict(weights, weights_only=True)  # never unpickle code from a weights file
    classifier = model.default_cfg.get("classifier", "")
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    missing = [k for k in model.state_dict() if k not in loaded and not k.endswith("num_batches_tracked")
               and not any(k.startswith(f"{c}.") for c in classifiers if c)]
    if missing:
        raise ValueError(f"pretrained {source!r} lacks {len(missing)} of the {arch!r} model's tensors "
                         f"(e.g. {', '.join(missing[:3])}): are these weights of a {arch!r}, saved with timm's names?")


def create_classifier(arch: str, in_chans: int = 1, num_classes: int = 2, clinical_dim: int = 0,
                      drop_rate: float = 0.0, drop_path_rate: float = 0.0, fusion_hidden: int = 64,
                      fusion_dropout: float = 0.1, column_dropout: float = 0.1, pretrained: str = "",
                      **timm_kwargs: Any) -> nn.Module:
    """A timm classifier, random (`pretrained=""`) or started from weights; with `clinical_dim` > 0, a fusion classifier.

    `pretrained`: see `pretrained_overlay`; an ``hf-hub:`` id needs the hub to be reachable.
    `clinical_dim` must be the width of `ClinicalEncoding` (the fusion head checks the feature names).
    """
    import timm

    if drop_path_rate:
        timm_kwargs["drop_path_rate"] = drop_path_rate
    if pretrained:
        try:
            pinned = resolve_pretrained(pretrained)  # hf-hub: load exactly the revision that is recorded
        except (OSError, ValueError) as err:
            raise RuntimeError(f"could not fetch pretrained weights {pretrained!r} from the Hugging Face hub "
                               f"({err}). Where the hub cannot be reached, download the model elsewhere and set "
                               "`pretrained` to its local folder (model.safetensors + config.json)") from err
        # timm (>= 1.0.31, the floor in pyproject) loads .pth/.bin files with torch.load(weights_only=True)
        timm_kwargs["pretrained_cfg_overlay"] = pretrained_overlay(pinned, arch)
    try:
        backbone = timm.create_model(arch, pretrained=bool(pretrained), num_classes=num_classes, in_chans=in_chans,
                                     drop_rate=drop_rate, **timm_kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            if pretrained:
                raise RuntimeError(f"could not load pretrained weights {pretrained!r} into {arch!r}: {err}") from err
            raise
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:8]
        raise ValueError(f"unknown timm architecture {arch!r}; similar names: {', '.join(close) or 'none'} "
                         "(timm.list_models() lists all)") from None
    except (OSError, ValueError) as err:  # huggingface_hub: offline, unreachable, unknown repository
        if not pretrained.startswith(HF_HUB):
            raise
        raise RuntimeError(f"could not fetch pretrained weights {pretrained!r} from the Hugging Face hub ({err}). "
                           "Where the hub cannot be reached, download the model elsewhere and set `pretrained` to "
                           "its local folder (model.safetensors + config.json)") from err
    if pretrained and "file" in timm_kwargs["pretrained_cfg_overlay"]:
        _check_loaded(backbone, timm_kwargs["pretrained_cfg_overlay"]["file"], pretrained, arch)
    if not pretrained:
        rescale_classifier(backbone)
    if not clinical_dim:
        return backbone
    width = ClinicalEncoding().width
    if clinical_dim != width:
        raise ValueError(f"clinical_dim={clinical_dim}, but the clinical encoding has {width} features")
    head = ClinicalFusionHead(FusionHeadConfig(embed_dim=backbone.num_features, num_classes=num_classes,
                                               hidden=fusion_hidden, dropout=fusion_dropout,
                                               column_dropout=column_dropout))
    return ClinicalFusionClassifier(backbone, head)


def rescale_classifier(model: nn.Module) -> None:
    """Give a timm model's last (classifier) layer PyTorch's default initialisation, uniform within
    ±1/sqrt(fan_in): logits start small, near the constant prediction (cross-entropy ln 2).

    timm initialises some heads (MobileNetV3, EfficientNet) uniform within ±1/sqrt(classes), ±0.71 for two
    classes, on 1,024-1,280 unnormalised features: a from-scratch student's logits were large from the
    first steps and its training cross-entropy stayed at 1.3-5 against a constant predictor's 0.69 for the
    whole run. ResNet heads already start this way."""
    layer = model.get_classifier()
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        layer.reset_parameters()


def uses_clinical(model: nn.Module) -> bool:
    return isinstance(unwrap(model), ClinicalFusionClassifier)


def image_model(model: nn.Module) -> nn.Module:
    """The timm model: the backbone of a fusion classifier, or the classifier itself."""
    inner = unwrap(model)
    return inner.backbone if isinstance(inner, ClinicalFusionClassifier) else inner


def classify(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits for a batch of the task.py contract; passes `clinical` only to fusion classifiers."""
    if uses_clinical(model):
        return model(batch["image"], batch["clinical"])
    return model(batch["image"])


@dataclass
class ClassifierOutput:
    features: torch.Tensor  # last feature map [B, C, H, W]
    logits: torch.Tensor  # [B, num_classes]


def run_classifier(model: nn.Module, batch: dict[str, Any]) -> ClassifierOutput:
    """One pass of a diffkd classifier giving both its last feature map and its logits.

    The same logits as `classify` (a test pins the two together), computed from the
    pieces so that the backbone runs once: timm's forward_features / forward_head, and for a fusion
    classifier its rule, image logits + fusion head(embedding, clinical).
    """
    backbone = image_model(model)
    feature_map = backbone.forward_features(batch["image"])
    if not uses_clinical(model):
        return ClassifierOutput(features=feature_map, logits=backbone.forward_head(feature_map))
    embedding = backbone.forward_head(feature_map, pre_logits=True)
    logits = backbone.get_classifier()(embedding) + unwrap(model).head(embedding, batch["clinical"])
    return ClassifierOutput(features=feature_map, logits=logits)


def features(model: nn.Module, x: torch.Tensor, pooled: bool = True) -> torch.Tensor:
    """Image features for distillation: the pooled embedding [B, D] (pre-logits) or the last feature map [B, C, h, w]."""
    backbone = image_model(model)
    feature_map = backbone.forward_features(x)
    return backbone.forward_head(feature_map, pre_logits=True) if pooled else feature_map


def data_config(image_size: int, in_chans: int, mean: float, std: float) -> dict:
    """timm's preprocessing description for config.json: fixed-size gray input, one normalisation per channel."""
    return {"input_size": (in_chans, image_size, image_size), "mean": (mean,) * in_chans, "std": (std,) * in_chans,
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def save_classifier(model: nn.Module, out_dir: str, preprocessing: dict | None = None,
                    label_names: tuple[str, str] = DEFAULT_LABEL_NAMES) -> None:
    """Write the classifier in timm's layout (see module doc) into `out_dir`; `label_names` name its
    two outputs (the dataset's outcome names).

    Files are written into a temporary folder beside them and moved into place one by one, config
    last, so a crash never leaves a half-written file; other files in `out_dir` are left alone.
    """
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    inner = unwrap(model)
    backbone = image_model(inner)
    os.makedirs(out_dir, exist_ok=True)
    staging = os.path.join(out_dir, f".saving-{secrets.token_hex(4)}")
    try:
        save_for_hf(backbone, staging, safe_serialization=True, data_config=preprocessing,
                    model_config={"label_names": list(label_names)} if backbone.num_classes == NUM_LABELS else None)
        config_path = os.path.join(staging, CONFIG)
        with open(config_path) as f:
            config = json.load(f)
        for key in _IMAGENET_PROVENANCE:
            config["pretrained_cfg"].pop(key, None)
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
        names = [WEIGHTS]
        if isinstance(inner, ClinicalFusionClassifier):
            save_file({k: v.contiguous() for k, v in inner.head.state_dict().items()},
                      os.path.join(staging, FUSION_WEIGHTS))
            with open(os.path.join(staging, FUSION_CONFIG), "w") as f:
                json.dump(vars(inner.head.config), f, indent=2)
            names += [FUSION_WEIGHTS, FUSION_CONFIG]
        else:
            for stale in (FUSION_WEIGHTS, FUSION_CONFIG):  # an earlier fusion model's head must not linger
                if os.path.exists(os.path.join(out_dir, stale)):
                    os.remove(os.path.join(out_dir, stale))
        for name in [*names, CONFIG]:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_classifier(model_dir: str) -> nn.Module:
    """A classifier saved by `save_classifier` (or any timm folder of the same layout), in eval mode."""
    import timm
    from safetensors.torch import load_file

    config_path = os.path.join(model_dir, CONFIG)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_path} does not exist: {model_dir} is not a saved classifier") from None
    args = dict(config.get("model_args") or {"num_classes": config["num_classes"]})
    model = timm.create_model(config["architecture"], pretrained=False, **args)
    model.load_state_dict(load_file(os.path.join(model_dir, WEIGHTS)))
    head_config = os.path.join(model_dir, FUSION_CONFIG)
    if os.path.exists(head_config):
        with open(head_config) as f:
            head = ClinicalFusionHead(FusionHeadConfig(**json.load(f)))
        head.load_state_dict(load_file(os.path.join(model_dir, FUSION_WEIGHTS)))
        model = ClinicalFusionClassifier(model, head)
    return model.eval()
