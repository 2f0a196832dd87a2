"""The pretraining run config: dataclasses, filled from configs/*.yaml and command-line overrides."""
from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from ..errors import UserError
from ..modeling import MPNetConfig


@dataclass
class DataConfig:
    path: str = "embedded"  # "embedded" (the bundled Austen corpus), raw text / JSONL, or a preprocessed dir
    tokenizer: str = "default"  # "default" (MPNet WordPiece), an HF tokenizer dir, or a sentencepiece .model
    block_size: int = 128  # tokens per training example
    pred_prob: float = 0.15  # fraction of each example that is predicted
    whole_word_mask: bool = False
    document_isolation: bool = False  # attention never crosses the </s> between documents; positions restart
    valid_fraction: float = 0.02
    num_workers: int = 0  # DataLoader workers building batches (0: in the training process)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "linear"  # linear | polynomial | constant (after warmup)
    power: float = 1.0  # for polynomial decay
    end_lr: float = 0.0
    clip_grad_norm: float = 1.0  # <= 0 disables clipping


@dataclass
class TrainingConfig:
    max_steps: int = 1000
    batch_size: int = 16  # examples per micro-batch per process
    grad_accum: int = 1
    seed: int = 0
    bf16: bool = True  # autocast on CUDA; ignored on CPU
    compile: bool = False  # torch.compile the model
    init_from: str | None = None  # continue pretraining from this HF MPNet directory


@dataclass
class LoggingConfig:
    log_every: int = 10
    valid_every: int = 200
    valid_batches: int = 8
    save_every: int = 500
    keep_last: int = 3
    progress_bar: bool = True


@dataclass
class DistributedConfig:
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP when launched with torchrun


@dataclass
class PretrainConfig:
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


PRESETS = {"tiny": MPNetConfig.tiny, "base": MPNetConfig.base}


def model_config(section: dict, **fixed) -> MPNetConfig:
    """Preset + the section's fields + values fixed by the run (vocabulary, backend)."""
    section = dict(section)
    preset = section.pop("preset", "base")
    if preset not in PRESETS:
        raise UserError(f"unknown model preset '{preset}'; choose one of {', '.join(PRESETS)}")
    known = set(MPNetConfig().to_dict())
    unknown = sorted(set(section) - known)
    if unknown:
        raise UserError(f"unknown model config key 'model.{unknown[0]}'; it is not a field of MPNetConfig")
    values = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in section.items()}  # CLI strings
    return PRESETS[preset](**{**values, **fixed})
