"""How the shared training loop runs: workers, optimisation, stopping, checkpoints and the run's name.

Its own module, below `loop.py`: every stage's config nests a LoopConfig, and reading a config must not
import the loop (Ray Train, DeepSpeed).
"""
from __future__ import annotations

from dataclasses import dataclass

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's, for the worker group
ENGINES = ("auto", "deepspeed", "ddp")


@dataclass
class LoopConfig:
    # workers
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # logical CPUs a worker reserves (fractions allowed)
    threads_per_worker: int = 1  # torch intra-op threads per worker; 0 keeps torch's default
    # PACK fills a node before the next (fast intra-node all-reduce); SPREAD puts workers on different
    # nodes (one node's loss costs fewer workers); STRICT_* refuse to run otherwise
    placement_strategy: str = "PACK"
    # optimisation
    epochs: int = 10
    batch_size: int = 32  # per worker and micro-step
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05  # of all optimizer steps, linear from 0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    # Exponential moving average of the weights (diffkd/train/ema.py): validated, kept as the best epoch and
    # exported in place of the raw weights; 0 = off. Needs ZeRO stage 0-2 (every rank holds whole weights).
    ema_decay: float = 0.0
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    # auto | deepspeed | ddp. auto: plain torch DDP at ZeRO stage 0 (it overlaps the gradient
    # all-reduce with backward, which DeepSpeed at stage 0 does not), DeepSpeed for stages 1-3
    # (sharding needs it); see docs/design.md "Engines"
    engine: str = "auto"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    shuffle_buffer: int = 256  # rows in the local shuffle buffer of the train stream (0 = stream order)
    eval_batch_size: int = 0  # 0 = batch_size
    max_steps_per_epoch: int = 0  # 0 = the whole shard; a cap for quick runs and benchmarks
    train_samples: int = 0  # rows of "train" for the LR schedule length; 0 = count them
    # stopping and checkpoints
    patience: int = 0  # epochs without a better objective before stopping; 0 = never stop early
    # Burn-in: no epoch before this one is kept as the best, and early stopping waits for it (a
    # distilled student's validation AUC can peak by chance long before it has learned its teacher).
    # epochs or more = keep the last epoch (a search may shorten `epochs` below it); 0 = any epoch
    min_epochs: int = 0
    keep_checkpoints: int = 3  # Ray keeps the best by objective and always the latest
    # the run
    storage_path: str = "runs"  # local directory or pyarrow filesystem URI (s3://, gs://, file://)
    run_name: str = ""  # "" = <task>-<timestamp>-<random>
    resume: bool = False  # continue the run called run_name from its last good checkpoint
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up
    seed: int = 0
    progress: bool = True
    progress_interval_s: float = 30.0  # heartbeat inside long epochs

    def __post_init__(self) -> None:
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"loop.placement_strategy {self.placement_strategy!r} must be one of "
                             f"{', '.join(PLACEMENT_STRATEGIES)}")
        if self.min_epochs < 0:
            raise ValueError(f"loop.min_epochs must be >= 0, got {self.min_epochs}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"loop.ema_decay must be within [0, 1) (0 = no weight average), got {self.ema_decay}")
        if self.ema_decay and self.zero_stage == 3:
            raise ValueError("loop.ema_decay needs whole weights on every rank: use zero_stage 0-2, or ema_decay 0")
        if self.engine not in ENGINES:
            raise ValueError(f"loop.engine {self.engine!r} must be one of {', '.join(ENGINES)}")
        if self.resolved_engine == "ddp" and self.zero_stage:
            raise ValueError(f"loop.engine 'ddp' cannot shard training state (zero_stage={self.zero_stage}); "
                             "use engine 'deepspeed' for ZeRO stages 1-3, or zero_stage 0")

    @property
    def resolved_engine(self) -> str:
        """The engine that trains: `engine`, with auto resolved by the ZeRO stage."""
        if self.engine != "auto":
            return self.engine
        return "ddp" if self.zero_stage == 0 else "deepspeed"
