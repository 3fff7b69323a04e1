"""Stage 1: DDPM training of the conditional denoiser, as a Task for the shared loop.

`diffusion_loss` is the plain step (model, batch) -> StepOutput that tests call without Ray;
`DiffusionTask` adds what the loop needs around it (EMA, validation, export to a diffusers folder);
`train_diffusion` is the high-level entry: dataset -> splits -> Ray datasets -> `fit` -> pipeline folder.

The generator trains on the training split of the internal centers only: external centers and the
internal validation split stay unseen, so the audit can compare synthetic images with real images
the generator never saw, and no external test image leaks into the teacher through synthesis.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.config import from_dict, to_dict
from diffkd.data.augment import AugmentConfig
from diffkd.data.dataset import ImageDataset
from diffkd.data.pipeline import PipelineConfig, make_dataset
from diffkd.data.splits import SplitConfig, ids_digest, split_case_ids
from diffkd.models import unwrap
from diffkd.models.diffusion import (SAMPLERS, TRAINING_INFO, ConditionalDenoiser, DiffusionModelConfig, build_denoiser,
                                     init_unet_from, load_denoiser, save_pipeline, training_info, training_scheduler,
                                     with_new_centers)
from diffkd.train.loop import fit
from diffkd.train.loop_config import LoopConfig
from diffkd.train.task import StepOutput, Task

log = logging.getLogger(__name__)


@dataclass
class DiffusionConfig:
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    centers: list[str] = field(default_factory=list)  # the center vocabulary; train_diffusion fills it
    cond_drop_prob: float = 0.1  # all conditions -> NULL: the unconditional branch classifier-free guidance needs
    clinical_drop_prob: float = 0.2  # clinical block alone -> NULL: sampling without clinical values stays in-domain
    center_unknown_prob: float = 0.05  # center -> UNKNOWN: a defined embedding for centers never seen
    snr_gamma: float | None = 5.0  # Min-SNR-γ loss weighting (Hang et al. 2023): faster convergence; None = plain MSE
    ema_decay: float = 0.999  # ceiling; the decay warms up (short runs would otherwise export near-random EMA)
    hflip: bool = True  # left/right flips (ultrasound has no preferred side; never flipped vertically)
    sampler: str = "ddim"  # saved with the pipeline; `diffkd synth run --sampler` can override
    val_timesteps: int = 10  # evaluation averages the loss over this fixed grid of timesteps
    norm_mean: float = 0.449  # the pipeline's fixed intensity normalisation, undone before noising
    norm_std: float = 0.226
    seed: int = 0
    # A saved pipeline folder to extend instead of training from scratch: centers it does not know get
    # their own embedding row, trained on their rows alone, and every other weight stays as it was.
    base_model: str = ""
    # A diffusers folder (a UNet2DModel folder, or a pipeline folder with unet/) whose UNet weights start
    # training instead of random ones; the condition encoder starts fresh. "" = from scratch.
    init_from: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = from_dict(DiffusionModelConfig, self.model, "diffusion.model")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"diffusion.snr_gamma = {self.snr_gamma} must be positive (or null for plain MSE)")
        for name in ("cond_drop_prob", "clinical_drop_prob", "center_unknown_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"diffusion.{name} = {getattr(self, name)} must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"diffusion.ema_decay = {self.ema_decay} must be in [0, 1)")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"diffusion.sampler {self.sampler!r} must be one of {', '.join(SAMPLERS)}")
        if self.init_from and self.base_model:
            raise ValueError("diffusion: init_from (a UNet to start from) and base_model (a trained generator to "
                             "extend with new centers) exclude each other; set one")


class DenoiserWithEMA(nn.Module):
    """The trained denoiser plus its exponential moving average, in one module.

    Keeping the EMA inside the model puts it into every checkpoint the loop writes (so a resumed run
    continues the same average) and into `FitResult.load_model`; its parameters are frozen, so the
    optimizer never sees them. Forward runs the live model.
    """

    def __init__(self, model: ConditionalDenoiser):
        super().__init__()
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> "DenoiserWithEMA":
        super().train(mode)
        self.ema.eval()  # the average never runs in training mode
        return self

    @torch.no_grad()
    def update_ema(self, max_decay: float) -> None:
        # The usual warm-up (1 + n) / (10 + n): early on the average follows the weights closely.
        n = int(self.ema_steps)
        decay = min(max_decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)
        self.ema_steps += 1


def to_model_range(image: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """Batch images (pipeline normalisation (x - mean) / std of [0, 1] intensities) -> [-1, 1]."""
    return (image * cfg.norm_std + cfg.norm_mean) * 2.0 - 1.0


def conditions_of(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"label": batch["label"], "center_idx": batch["center_idx"], "modality_idx": batch["modality_idx"],
            "clinical": batch["clinical"]}


def diffusion_loss(model: nn.Module, batch: dict[str, Any], scheduler, cfg: DiffusionConfig, *,
                   train: bool = True, generator: torch.Generator | None = None,
                   timesteps: torch.Tensor | None = None) -> StepOutput:
    """DDPM loss on one batch: noise the images at random timesteps, predict epsilon or v, MSE.

    `train` applies condition dropout (here, not in the data, so every epoch sees new drop patterns).
    `generator` / `timesteps` make the loss deterministic (evaluation).
    """
    x0 = to_model_range(batch["image"], cfg)
    size, chans = cfg.model.image_size, cfg.model.in_chans
    if tuple(x0.shape[1:]) != (chans, size, size):
        raise ValueError(f"diffusion batch images are {tuple(x0.shape[1:])}, the model expects "
                         f"({chans}, {size}, {size}); set the pipeline's image_size/in_chans to match")
    n, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    target = noise if cfg.model.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)

    conditions = conditions_of(batch)
    drop = drop_clinical = None
    if train:
        draw = torch.rand((3, n), generator=generator, device=device)
        drop, drop_clinical = draw[0] < cfg.cond_drop_prob, draw[1] < cfg.clinical_drop_prob
        unknown = len(cfg.centers)  # the encoder's UNKNOWN center token (and the pipeline's unknown index)
        conditions["center_idx"] = torch.where(draw[2] < cfg.center_unknown_prob,
                                               torch.full_like(conditions["center_idx"], unknown),
                                               conditions["center_idx"])
    mask = batch.get("mask") if cfg.model.mask_channel else None
    pred = model(noisy, timesteps, conditions, drop=drop, drop_clinical=drop_clinical, mask=mask)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    mse = per_sample.mean()
    loss = mse if cfg.snr_gamma is None else (per_sample * min_snr_weights(scheduler, timesteps, cfg)).mean()
    return StepOutput(loss=loss, num_samples=n, metrics={"mse": float(mse.detach())})


def min_snr_weights(scheduler, timesteps: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """Min-SNR-γ: cap each timestep's weight at γ/SNR so that the many nearly clean (high SNR) steps stop
    dominating the gradient; the v-prediction form divides by SNR + 1 since its target already scales so."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1.0 - alpha_bar)
    capped = torch.clamp(snr, max=cfg.snr_gamma)
    return capped / snr if cfg.model.prediction_type == "epsilon" else capped / (snr + 1.0)


class DiffusionTask(Task):
    name = "diffusion"
    objective = "val_loss"
    mode = "min"

    def __init__(self, config: DiffusionConfig):
        if not config.centers:
            raise ValueError("DiffusionConfig.centers is empty: the condition vocabulary must list the training centers")
        self.config = config
        self.scheduler = training_scheduler(config.model)

    def build_model(self) -> DenoiserWithEMA:
        torch.manual_seed(self.config.seed)
        if not self.config.base_model:
            denoiser = build_denoiser(self.config.model, self.config.centers)
            if self.config.init_from:
                init_unet_from(denoiser.unet, self.config.init_from)
            return DenoiserWithEMA(denoiser)
        denoiser, new_rows = with_new_centers(load_denoiser(self.config.base_model), self.config.centers)
        denoiser.requires_grad_(False)
        table = denoiser.condition_encoder.center_embedding.weight.requires_grad_(True)
        # The optimizer updates the whole table; after each step every row but the new centers' is put back.
        self._kept_rows = torch.ones(len(table), dtype=torch.bool)
        self._kept_rows[new_rows] = False
        self._kept_values = table.detach().clone()
        return DenoiserWithEMA(denoiser)

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        return diffusion_loss(model, batch, self.scheduler, self.config, train=True)

    def after_optimizer_step(self, model: nn.Module) -> None:
        denoiser = unwrap(model)
        if self.config.base_model:
            with torch.no_grad():
                table = denoiser.model.condition_encoder.center_embedding.weight
                kept = self._kept_rows.to(table.device)
                table[kept] = self._kept_values.to(table)[kept]
        denoiser.update_ema(self.config.ema_decay)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Loss of the EMA model (what gets exported) on a fixed timestep grid with fixed noise."""
        ema = unwrap(model).ema
        grid = torch.linspace(0, self.scheduler.config.num_train_timesteps - 1, self.config.val_timesteps).long()
        total, count = 0.0, 0
        for i, batch in enumerate(batches):
            generator = torch.Generator(batch["image"].device).manual_seed(self.config.seed + i)
            n = len(batch["label"])
            for t in grid:
                out = diffusion_loss(ema, batch, self.scheduler, self.config, train=False, generator=generator,
                                     timesteps=t.repeat(n).to(batch["image"].device))
                total += float(out.loss) * n
                count += n
        return {"val_loss": total / count if count else float("nan")}

    def export(self, model: nn.Module, out_dir: str, info: dict | None = None) -> None:
        """The EMA weights as a diffusers pipeline folder (UNet + sampling scheduler + condition encoder);
        `info` (what trained it) goes beside them as diffkd_training.json."""
        save_pipeline(unwrap(model).ema, self.scheduler.config, out_dir, sampler=self.config.sampler,
                      extra_json={TRAINING_INFO: info} if info else None)


# ---- the high-level entry -------------------------------------------------------------------------

@dataclass
class DiffusionTrainConfig:
    """What `train_diffusion` trains: the generator (saved with its pipeline) and the loop that trains it."""
    model: DiffusionConfig = field(default_factory=DiffusionConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=20, lr=1e-3, weight_decay=0.0, batch_size=16))


@dataclass
class DiffusionResult:
    model_dir: str
    run_name: str
    history: list[dict]
    best_metrics: dict
    train_rows: int


def generator_pipeline_config(config: DiffusionConfig, batch_size: int) -> "PipelineConfig":
    """The data pipeline as the generator sees it: model-sized images, flips only, no synthetic rows."""
    flips_only = AugmentConfig(hflip_p=0.5 if config.hflip else 0.0, rotate_deg=0.0, scale=(1.0, 1.0),
                               translate=0.0, gain_db=0.0, gamma=(1.0, 1.0), speckle_p=0.0)
    return PipelineConfig(image_size=config.model.image_size, in_chans=config.model.in_chans, augment=config.hflip,
                          augmentation=flips_only, synthetic_ratio=0.0, centers=tuple(config.centers),
                          batch_size=batch_size, seed=config.seed, norm_mean=config.norm_mean,
                          norm_std=config.norm_std)


def train_diffusion(dataset: "ImageDataset | str", split: SplitConfig | None, cfg: DiffusionTrainConfig | None,
                    out_dir: str) -> DiffusionResult:
    """Train the conditional generator on the internal training split and write the pipeline folder.

    The same shape as the classifier stages' entries (dataset, split, config, output folder), but the
    split is its spec, not a split table: the generator records the spec so that synthesis and the
    audit can recompute which rows it learnt from. `out_dir` receives `model_index.json`, `unet/`, `scheduler/`, `condition_encoder/` and
    `diffkd_training.json` (the split spec and a digest of the training case ids, so synthesis and
    the audit can recompute exactly which rows trained the model).
    """

    dataset = ImageDataset.open(dataset)
    cfg = cfg or DiffusionTrainConfig()
    config, loop = cfg.model, cfg.loop
    split = split or SplitConfig()
    base_centers: list[str] = []
    if config.base_model:
        config, split, base_centers = _extension_of(config, split)
    if loop.zero_stage == 3:
        raise ValueError("diffusion: ZeRO stage 3 partitions the EMA copy's parameters; use zero_stage 0-2")
    meta = dataset.metadata().to_pandas()
    ids = split_case_ids(meta, split)
    if not ids["train"]:
        raise ValueError(f"dataset {dataset.uri} has no internal training rows after holding out {split.external}")
    train_meta = meta[meta["case_id"].isin(ids["train"])]
    trained_centers = sorted(train_meta["center"].unique())
    # known centers keep their positions: token ids and the pipeline's center_idx both follow this order
    config = dataclasses.replace(config, centers=base_centers + [c for c in trained_centers if c not in base_centers])
    centers = [c for c in config.centers if c not in base_centers]  # what this run learns from
    if not centers:
        raise ValueError(f"the base model {config.base_model} already knows every training center "
                         f"({', '.join(base_centers)}): ingest the new center first, or train from scratch")
    pipe_cfg = generator_pipeline_config(config, loop.batch_size)
    center_of = dict(zip(meta["case_id"], meta["center"]))
    learn = {name: [c for c in ids[name] if center_of[c] in centers] for name in ("train", "val")}
    datasets = {"train": make_dataset(dataset, learn["train"], pipe_cfg, train=True, centers=centers)}
    if learn["val"]:
        datasets["val"] = make_dataset(dataset, learn["val"], pipe_cfg, train=False, centers=centers)
    log.info("diffusion: %d training rows from %d center(s) (%s), %d validation rows, %dpx%s",
             len(learn["train"]), len(centers), ", ".join(centers), len(learn["val"]), config.model.image_size,
             f"; only their center embeddings are trained on top of {config.base_model}" if base_centers else "")
    task = DiffusionTask(config)
    result = fit(task, datasets, dataclasses.replace(loop, train_samples=loop.train_samples or len(learn["train"])))
    model = result.load_model(task, which="best")
    info = {
        "task": task.name, "run_name": result.run_name, "config": to_dict(config), "split": to_dict(split),
        "train_rows": len(ids["train"]), "train_case_ids_sha256": ids_digest(ids["train"]),
        "best_epoch": result.best_epoch, "best_metrics": result.best_metrics, "history": result.history,
        "ema_steps": int(unwrap(model).ema_steps), "learnt_centers": centers,
        "initialised_from": generator_start(config),
    }
    task.export(model, out_dir, info)
    return DiffusionResult(model_dir=out_dir, run_name=result.run_name, history=result.history,
                           best_metrics=result.best_metrics, train_rows=len(ids["train"]))


def generator_start(config: DiffusionConfig) -> str:
    """The generator's `initialised_from`: "scratch", the UNet folder it started from, or the model it extends."""
    start = config.init_from or config.base_model
    return os.path.abspath(start) if start else "scratch"


def _extension_of(config: DiffusionConfig, split: SplitConfig) -> tuple[DiffusionConfig, SplitConfig, list[str]]:
    """For `base_model`: its architecture and noise schedule, its split (the rows that trained the extended
    model must stay one recomputable split), and the centers it knows."""

    base = training_info(config.base_model)
    if dataclasses.asdict(split) != base["split"]:
        log.info("extending %s: its split %s applies (not %s)", config.base_model, base["split"], dataclasses.asdict(split))
    model = from_dict(DiffusionModelConfig, base["config"]["model"], f"{config.base_model}: model")
    return dataclasses.replace(config, model=model), SplitConfig(**base["split"]), list(base["config"]["centers"])
