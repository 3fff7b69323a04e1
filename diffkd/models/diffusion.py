"""Conditional diffusion model: a diffusers UNet fed by a condition encoder, saved as a pipeline folder.

Why `UNet2DModel(class_embed_type="identity")` and not `UNet2DConditionModel` with cross-attention:
the conditions are a handful of global attributes (label, center, modality, clinical values), not a
token sequence. One vector added to the timestep embedding (the ADM way of class conditioning)
reaches every residual block, costs nothing per pixel, and keeps small CPU-sized UNets attention-free;
cross-attention pays off for long, structured prompts such as text.

Layout follows diffusers: models (UNet, `ConditionEncoder`), schedulers and the pipeline
(`ConditionalDiffusionPipeline`) are separate objects; the pipeline folder written by
`save_pretrained` holds ``unet/``, ``scheduler/`` and ``condition_encoder/`` (safetensors +
config.json) and loads back with `ConditionalDiffusionPipeline.from_pretrained`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from diffkd.data.schema import CLINICAL_COLUMNS, MODALITIES, NUM_LABELS, ClinicalEncoding
from diffkd.runtime.files import staged_directory

SAMPLERS = ("ddim", "dpm")
TRAINING_INFO = "diffkd_training.json"  # beside model_index.json: what the model was trained on


@dataclass
class DiffusionModelConfig:
    """Architecture and noise schedule. The paper-size example lives in configs/diffusion_example.yaml."""

    image_size: int = 64
    in_chans: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = False  # self-attention in the lowest-resolution blocks (paper size: True)
    mask_channel: bool = False  # lesion mask as an extra input channel (spatial conditioning)
    condition_dim: int = 128  # width of the condition encoder's hidden layer
    # v: on the demo phantom (32 px, 200 steps of 16) v-prediction gave clean images with each center's
    # geometry where epsilon-prediction left visible pixel noise at the same budget.
    prediction_type: str = "v_prediction"  # or "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} must be 'epsilon' or 'v_prediction'")
        if self.image_size % (2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{len(self.block_out_channels) - 1} "
                             f"for block_out_channels {self.block_out_channels}")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4  # UNet2DModel's timestep-embedding width


class ConditionEncoder(ModelMixin, ConfigMixin):
    """Label, center, modality and clinical attributes -> one vector added to the UNet's time embedding.

    Every categorical field has a NULL token (classifier-free guidance drops conditions to it);
    center and modality also have an UNKNOWN token, so a center the model never saw (or a new
    modality) still has a defined embedding. Clinical values go through `ClinicalEncoding`
    (standardised numbers, one-hot categories, a missing flag per column) and a small MLP; a
    dropped clinical block is replaced by a learned null vector.
    """

    @register_to_config
    def __init__(self, centers: Sequence[str] = (), modalities: Sequence[str] = MODALITIES,
                 num_labels: int = NUM_LABELS, clinical_columns: Sequence[str] = CLINICAL_COLUMNS,
                 hidden_dim: int = 128, out_dim: int = 128):
        super().__init__()
        self.centers = list(centers)
        self.modalities = list(modalities)
        self.clinical_encoding = ClinicalEncoding(columns=tuple(clinical_columns))
        # Token layout per field: real values first, then UNKNOWN (center/modality), then NULL.
        self.label_embedding = nn.Embedding(num_labels + 1, hidden_dim)
        self.center_embedding = nn.Embedding(len(self.centers) + 2, hidden_dim)
        self.modality_embedding = nn.Embedding(len(self.modalities) + 2, hidden_dim)
        self.clinical_mlp = nn.Sequential(nn.Linear(self.clinical_encoding.width, hidden_dim), nn.SiLU(),
                                          nn.Linear(hidden_dim, hidden_dim))
        self.clinical_null = nn.Parameter(torch.zeros(hidden_dim))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, out_dim))

    # ---- token ids ------------------------------------------------------------------------
    @property
    def label_null(self) -> int:
        return self.config.num_labels

    @property
    def center_unknown(self) -> int:
        return len(self.centers)

    @property
    def center_null(self) -> int:
        return len(self.centers) + 1

    @property
    def modality_unknown(self) -> int:
        return len(self.modalities)

    @property
    def modality_null(self) -> int:
        return len(self.modalities) + 1

    def center_index(self, center: str | None) -> int:
        return self.centers.index(center) if center in self.centers else self.center_unknown

    def modality_index(self, modality: str | None) -> int:
        return self.modalities.index(modality) if modality in self.modalities else self.modality_unknown

    def encode_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Condition rows (label, center, modality, clinical columns) -> the tensors `forward` takes."""
        labels = []
        for i, row in enumerate(rows):
            label = row.get("label")
            if label is None or not 0 <= int(label) < self.config.num_labels:
                raise ValueError(f"condition row {i}: label {label!r} must be an integer in "
                                 f"[0, {self.config.num_labels - 1}]")
            labels.append(int(label))
        return {
            "label": torch.tensor(labels, dtype=torch.long),
            "center_idx": torch.tensor([self.center_index(r.get("center")) for r in rows], dtype=torch.long),
            "modality_idx": torch.tensor([self.modality_index(r.get("modality")) for r in rows], dtype=torch.long),
            "clinical": torch.tensor([self.clinical_encoding.encode_row(dict(r)) for r in rows],
                                     dtype=torch.float32).reshape(len(rows), self.clinical_encoding.width),
        }

    def forward(self, label: torch.Tensor, center_idx: torch.Tensor, modality_idx: torch.Tensor,
                clinical: torch.Tensor, drop: torch.Tensor | None = None,
                drop_clinical: torch.Tensor | None = None) -> torch.Tensor:
        """`drop` [B] bool replaces every condition by NULL (the unconditional branch of CFG);
        `drop_clinical` [B] bool drops only the clinical block (trains sampling without clinical values)."""
        if drop is not None:
            label = torch.where(drop, torch.full_like(label, self.label_null), label)
            center_idx = torch.where(drop, torch.full_like(center_idx, self.center_null), center_idx)
            modality_idx = torch.where(drop, torch.full_like(modality_idx, self.modality_null), modality_idx)
            drop_clinical = drop if drop_clinical is None else drop | drop_clinical
        clinical_emb = self.clinical_mlp(clinical.to(self.clinical_null.dtype))
        if drop_clinical is not None:
            clinical_emb = torch.where(drop_clinical[:, None], self.clinical_null.expand_as(clinical_emb), clinical_emb)
        hidden = (self.label_embedding(label) + self.center_embedding(center_idx)
                  + self.modality_embedding(modality_idx) + clinical_emb)
        return self.out(hidden)


class ConditionalDenoiser(nn.Module):
    """The trainable pair (UNet + condition encoder) as one module, so DeepSpeed and EMA see both."""

    def __init__(self, unet: UNet2DModel, condition_encoder: ConditionEncoder, mask_channel: bool):
        super().__init__()
        self.unet = unet
        self.condition_encoder = condition_encoder
        self.mask_channel = mask_channel

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, conditions: Mapping[str, torch.Tensor],
                drop: torch.Tensor | None = None, drop_clinical: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        embedding = self.condition_encoder(conditions["label"], conditions["center_idx"], conditions["modality_idx"],
                                           conditions["clinical"], drop=drop, drop_clinical=drop_clinical)
        return self.unet(_with_mask(sample, mask, self.mask_channel), timestep,
                         class_labels=embedding.to(sample.dtype)).sample


def _with_mask(sample: torch.Tensor, mask: torch.Tensor | None, mask_channel: bool) -> torch.Tensor:
    if not mask_channel:
        return sample
    if mask is None:
        mask = torch.zeros_like(sample[:, :1])  # unknown mask: the same zeros training saw for rows without one
    return torch.cat([sample, mask.to(sample.dtype)], dim=1)


def build_denoiser(cfg: DiffusionModelConfig, centers: Sequence[str],
                   modalities: Sequence[str] = MODALITIES) -> ConditionalDenoiser:
    attention = cfg.attention
    n = len(cfg.block_out_channels)
    down = tuple("AttnDownBlock2D" if attention and i == n - 1 else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if attention and i == 0 else "UpBlock2D" for i in range(n))
    unet = UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_chans + int(cfg.mask_channel),
        out_channels=cfg.in_chans,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        add_attention=attention,  # the mid-block's attention
        class_embed_type="identity",
        norm_num_groups=min(32, cfg.block_out_channels[0]),
    )
    encoder = ConditionEncoder(centers=list(centers), modalities=list(modalities), hidden_dim=cfg.condition_dim,
                               out_dim=cfg.time_embed_dim)
    return ConditionalDenoiser(unet, encoder, cfg.mask_channel)


def init_unet_from(unet: UNet2DModel, source: str | os.PathLike) -> None:
    """Start `unet` from the UNet weights of a diffusers folder: a UNet2DModel folder (config.json +
    diffusion_pytorch_model.safetensors) or a pipeline folder with a `unet/` subfolder.

    The source must have the same layout (blocks, widths, input channels, identity class embedding):
    every weight is copied, so a mismatch is an error naming the first tensors that differ.
    """
    path = os.fspath(source)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"diffusion init_from {path!r} is not a folder (a diffusers UNet or pipeline folder)")
    folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"diffusion init_from {path!r}: no config.json there or in unet/; "
                                "give a diffusers UNet2DModel folder or a pipeline folder")
    donor = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).state_dict()
    own = unet.state_dict()
    differ = [k for k in own if k not in donor or donor[k].shape != own[k].shape]
    unused = [k for k in donor if k not in own]
    if differ or unused:
        raise ValueError(f"diffusion init_from {path!r}: its UNet does not match diffusion.model "
                         f"({len(differ)} tensor(s) missing or of another shape, e.g. {', '.join(differ[:3]) or '-'}; "
                         f"{len(unused)} unknown, e.g. {', '.join(unused[:3]) or '-'}); match block_out_channels, "
                         "layers_per_block, attention, mask_channel and in_chans to the source model")
    unet.load_state_dict(donor)


def with_new_centers(denoiser: ConditionalDenoiser, centers: Sequence[str]) -> tuple[ConditionalDenoiser, list[int]]:
    """`denoiser` whose center vocabulary also holds `centers` it did not know; returns it and the new rows.

    Known centers keep their token ids (synthesis and the data pipeline index centers by position),
    new ones are appended before UNKNOWN and NULL, and each new row starts as the UNKNOWN token's
    embedding: what the model already produced for a center it never saw. The UNet is shared.
    """
    old = denoiser.condition_encoder
    added = [c for c in dict.fromkeys(centers) if c not in old.centers]
    encoder = ConditionEncoder(centers=old.centers + added, modalities=old.modalities,
                               num_labels=old.config.num_labels, clinical_columns=old.config.clinical_columns,
                               hidden_dim=old.config.hidden_dim, out_dim=old.config.out_dim)
    state = old.state_dict()
    table, known = state["center_embedding.weight"], len(old.centers)
    unknown = table[known:known + 1]
    state["center_embedding.weight"] = torch.cat([table[:known], unknown.repeat(len(added), 1), table[known:]])
    encoder.load_state_dict(state)
    return ConditionalDenoiser(denoiser.unet, encoder, denoiser.mask_channel), list(range(known, known + len(added)))


def load_denoiser(model_dir: str | os.PathLike) -> ConditionalDenoiser:
    """The trainable pair of a saved pipeline folder (to fine-tune it)."""
    pipe = load_pipeline(model_dir)
    return ConditionalDenoiser(pipe.unet, pipe.condition_encoder, pipe.mask_channel)


def training_scheduler(cfg: DiffusionModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=True, clip_sample_range=1.0)


def sampling_scheduler(config: Mapping[str, Any], sampler: str = "ddim"):
    """A DDIM or DPM-Solver++ scheduler on the training noise schedule (`config` is any scheduler's config)."""
    if sampler == "ddim":
        # "trailing" spacing reaches the last training timestep, which matters at 20-50 steps.
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=True, set_alpha_to_one=False)
    if sampler == "dpm":
        # Thresholding clips the data prediction to [-1, 1] as DDIM's clip_sample does: at the first
        # steps of a cosine schedule alpha is ~0 and an unclipped x0 estimate explodes.
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="trailing", thresholding=True,
                                                       sample_max_value=1.0)
    raise ValueError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")


class ConditionalDiffusionPipeline(DiffusionPipeline):
    """Sample images for condition rows with classifier-free guidance.

    >>> pipe = ConditionalDiffusionPipeline.from_pretrained("DIR/models/diffusion")
    >>> out = pipe([{"label": 1, "center": "A", "modality": "us", "age": 61}], guidance_scale=2.0,
    ...            generator=torch.Generator().manual_seed(0))
    >>> out.images.shape  # (1, H, W, C) floats in [0, 1]
    """

    model_cpu_offload_seq = "condition_encoder->unet"

    def __init__(self, unet: UNet2DModel, scheduler, condition_encoder: ConditionEncoder):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, condition_encoder=condition_encoder)

    @property
    def mask_channel(self) -> bool:
        return self.unet.config.in_channels > self.unet.config.out_channels

    @torch.no_grad()
    def __call__(self, conditions: Sequence[Mapping[str, Any]], masks: torch.Tensor | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 2.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, eta: float = 0.0,
                 output_type: str = "np") -> ImagePipelineOutput:
        """`masks`: [B, 1, H, W] in {0, 1} when the UNet has a mask channel (None: unknown).
        `generator`: one, or one per row (then each image depends only on its own generator)."""
        device, dtype = self.unet.device, self.unet.dtype
        encoder = self.condition_encoder
        cond = {k: v.to(device) for k, v in encoder.encode_rows(conditions).items()}
        batch = len(conditions)
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.out_channels, size, size)
        sample = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if masks is not None:
            masks = masks.to(device=device, dtype=dtype)
        guided = guidance_scale != 1.0
        embedding = encoder(**cond)
        if guided:
            null = encoder(**cond, drop=torch.ones(batch, dtype=torch.bool, device=device))
            embedding = torch.cat([embedding, null])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([sample, sample]) if guided else sample
            mask_in = None if masks is None else (torch.cat([masks, masks]) if guided else masks)
            pred = self.unet(_with_mask(model_in, mask_in, self.mask_channel), t,
                             class_labels=embedding.to(dtype)).sample
            if guided:
                pred_cond, pred_null = pred.chunk(2)
                pred = pred_null + guidance_scale * (pred_cond - pred_null)
            step_kwargs = {"eta": eta} if isinstance(self.scheduler, DDIMScheduler) else {}
            sample = self.scheduler.step(pred, t, sample, generator=generator, **step_kwargs).prev_sample
        images = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        if output_type != "np":
            raise ValueError(f"output_type {output_type!r} must be 'np' or 'pt'")
        return ImagePipelineOutput(images=images.permute(0, 2, 3, 1).float().cpu().numpy())


def save_pipeline(denoiser: ConditionalDenoiser, scheduler_config: Mapping[str, Any], out_dir: str | os.PathLike,
                  sampler: str = "ddim", extra_json: Mapping[str, Mapping] | None = None) -> ConditionalDiffusionPipeline:
    """Write the pipeline folder atomically (temp folder, then rename over any previous one).

    `extra_json`: {file name: content} written beside model_index.json (e.g. what trained the model)."""
    out_dir = os.fspath(out_dir)
    pipe = ConditionalDiffusionPipeline(unet=denoiser.unet, scheduler=sampling_scheduler(scheduler_config, sampler),
                                        condition_encoder=denoiser.condition_encoder)
    with staged_directory(out_dir) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        for name, content in (extra_json or {}).items():
            with open(os.path.join(staging, name), "w") as f:
                json.dump(content, f, indent=2, default=float)
    return pipe


def load_pipeline(model_dir: str | os.PathLike, sampler: str | None = None,
                  device: str | torch.device = "cpu") -> ConditionalDiffusionPipeline:
    """Load a saved pipeline; `sampler` ("ddim" | "dpm") swaps the sampling scheduler."""
    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        raise FileNotFoundError(f"{model_dir} is not a diffusion pipeline folder (no model_index.json); "
                                "train one with `diffkd train diffusion` first")
    pipe = ConditionalDiffusionPipeline.from_pretrained(model_dir, low_cpu_mem_usage=False)  # no accelerate here
    if sampler is not None:
        pipe.scheduler = sampling_scheduler(pipe.scheduler.config, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output [B, H, W, C] in [0, 1] -> uint8 [B, H, W] (gray) or [B, H, W, C]."""
    out = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


# ---- provenance: which model this is, and what trained it ---------------------------------------
def model_fingerprint(model_dir: str) -> str:
    """sha256 over the pipeline's weight and config files: changes whenever the model does."""
    digest = hashlib.sha256()
    for sub in ("unet", "condition_encoder", "scheduler"):
        folder = os.path.join(model_dir, sub)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{model_dir} has no {sub}/ folder; is it a diffkd diffusion pipeline?")
        for name in sorted(os.listdir(folder)):
            digest.update(f"{sub}/{name}".encode())
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def training_info(model_dir: str) -> dict:
    """What trained the pipeline in `model_dir` (its split spec, row digest, config), as the diffusion stage saved it."""
    path = os.path.join(model_dir, TRAINING_INFO)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the pipeline folder was not written by diffkd's diffusion "
                                "stage, so which rows trained it is unknown")
    with open(path) as f:
        return json.load(f)
