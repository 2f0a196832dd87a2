"""The pretraining loop: data -> two-stream MPNet -> AdamW, with logging, validation and checkpoints.

Determinism is by construction: micro-batch j of optimizer step s is built from the examples at
global offset (s * micro_batches_per_step + j) * batch_size of a seeded per-epoch shuffle, and the
collator's permutation/corruption RNG is seeded from (seed, s, j). So the data position IS the step,
resuming needs no sampler state, and 2 processes see exactly what 1 process with 2 accumulation
steps sees.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ..configuration import to_dict
from ..errors import UserError
from ..modeling import MPNetForPretraining
from ..modeling.attention import CPU_TRAINING_MESSAGE
from ..modeling.checkpoint import read_state_dict, to_our_keys
from . import distributed as dist_utils
from .checkpointing import list_checkpoints, load_training_state, save_checkpoint
from .config import PretrainConfig, model_config
from .metrics import MetricsLogger, estimate_flops_per_example, peak_tflops_for

log = logging.getLogger("mpnet.pretrain")


# ------------------------------------------------------------------------------------------ data


class StepBatches(torch.utils.data.Dataset):
    """Item t is this process's micro-batch t = step * grad_accum + a, fully determined by t."""

    def __init__(self, blocks, collator, batch_size, grad_accum, world_size, rank, seed):
        self.blocks, self.collator = blocks, collator
        self.batch_size, self.grad_accum, self.world_size, self.rank = batch_size, grad_accum, world_size, rank
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self):
        return 2**62

    def _order(self, epoch):
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))}
        return self._orders[epoch]

    def __getitem__(self, t):
        step, accum = divmod(t, self.grad_accum)
        global_micro = accum * self.world_size + self.rank
        first = (step * self.grad_accum * self.world_size + global_micro) * self.batch_size
        examples = []
        for g in range(first, first + self.batch_size):
            epoch, offset = divmod(g, len(self.blocks))
            examples.append(self.blocks[int(self._order(epoch)[offset])])
        return self.collator(examples, step=step, rank=global_micro)


def _validation_batches(blocks, collator, batch_size, count):
    count = min(count, math.ceil(len(blocks) / batch_size))
    return [collator([blocks[i] for i in range(b * batch_size, min(len(blocks), (b + 1) * batch_size))],
                     step=b, rank=2**20) for b in range(count)]


def _to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------- optimizer


def build_optimizer(model, cfg, device):
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=device.type == "cuda")


def lr_multiplier(step, cfg, max_steps):
    """Linear warmup, then linear/polynomial decay to end_lr at max_steps (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    power = 1.0 if cfg.schedule == "linear" else cfg.power
    floor = cfg.end_lr / cfg.lr
    return floor + (1 - floor) * (1 - progress) ** power


# ------------------------------------------------------------------------------------------ loop


def _rng_state(device):
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state, device):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_vocab(model_vocab, meta, where):
    if model_vocab != meta["vocab_size"]:
        raise UserError(f"vocabulary mismatch: {where} has {model_vocab} tokens but the data was tokenized with "
                        f"{meta['tokenizer']} ({meta['vocab_size']} tokens); preprocess the corpus with the "
                        "checkpoint's tokenizer (data.tokenizer=<checkpoint dir>)")


def pretrain(cfg: PretrainConfig, output_dir, resume: bool = False) -> dict:
    from ..data import MPNetCollator, TokenBlocks, load_tokenizer, read_metadata, resolve_data, word_starts

    output_dir = Path(output_dir)
    env = dist_utils.setup()
    device = env.device
    use_flex = str(cfg.model.get("use_flex_attention", False)).lower() in ("true", "1", "yes")
    if use_flex and device.type != "cuda":
        raise UserError(CPU_TRAINING_MESSAGE)
    if cfg.training.batch_size <= 0 or cfg.training.grad_accum <= 0 or cfg.training.max_steps <= 0:
        raise UserError("training.batch_size, training.grad_accum and training.max_steps must be positive")

    checkpoints = list_checkpoints(output_dir) if resume else []
    if resume and not checkpoints:
        log.info("--resume: no checkpoint under %s yet, starting from scratch", output_dir)
    if not resume and list_checkpoints(output_dir):
        raise UserError(f"{output_dir} already holds checkpoints; pass --resume to continue that run, "
                        "or choose another --output-dir (nothing was overwritten)")

    # Data (rank 0 preprocesses raw text once; the others wait and reuse the cache).
    with dist_utils.rank_zero_first(env):
        shard_dir = resolve_data(cfg.data.path, output_dir / "data-cache", tokenizer=cfg.data.tokenizer)
    meta = read_metadata(shard_dir)
    tokenizer = load_tokenizer(str(Path(shard_dir) / "tokenizer"))
    train_blocks = TokenBlocks(shard_dir, split="train", block_size=cfg.data.block_size)
    valid_blocks = TokenBlocks(shard_dir, split="valid", block_size=cfg.data.block_size)
    if len(train_blocks) == 0:
        raise UserError(f"the corpus at {cfg.data.path} yields no training block of {cfg.data.block_size} tokens")
    collator = MPNetCollator(meta["vocab_size"], meta["pad_token_id"], meta["mask_token_id"],
                             meta["special_token_ids"], pred_prob=cfg.data.pred_prob,
                             whole_word_mask=cfg.data.whole_word_mask, seed=cfg.training.seed,
                             word_starts=word_starts(tokenizer) if cfg.data.whole_word_mask else None,
                             document_separator_id=meta["eos_token_id"] if cfg.data.document_isolation else None)

    # Model.
    torch.manual_seed(cfg.training.seed)
    fixed = dict(use_flex_attention=use_flex, pad_token_id=meta["pad_token_id"], mask_token_id=meta["mask_token_id"])
    if cfg.training.init_from:
        model = MPNetForPretraining.from_pretrained(cfg.training.init_from, **fixed, **_model_overrides(cfg.model))
        _check_vocab(model.config.vocab_size, meta, f"checkpoint {cfg.training.init_from}")
    else:
        if cfg.model.get("vocab_size") is not None:
            _check_vocab(int(cfg.model["vocab_size"]), meta, "the model config")
        model = MPNetForPretraining(model_config(cfg.model, vocab_size=meta["vocab_size"], **fixed))
    if cfg.data.block_size > model.config.max_sequence_length:
        raise UserError(f"data.block_size {cfg.data.block_size} is longer than the position table allows "
                        f"({model.config.max_sequence_length}); lower it or raise model.max_position_embeddings")
    model.to(device)

    start_step, state = 0, None
    if checkpoints:
        step, path = checkpoints[-1]
        state = load_training_state(path)
        weights = to_our_keys(read_state_dict(path))
        _check_vocab(weights["mpnet.embeddings.word_embeddings.weight"].shape[0], meta, f"checkpoint {path}")
        model.load_state_dict(weights, strict=False)
        model.tie_weights()
        start_step = state["step"]
        log.info("resuming from %s (step %d)", path, start_step)

    train_model = dist_utils.wrap(model, env, fsdp=cfg.distributed.fsdp)
    optimizer = build_optimizer(train_model, cfg.optim, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg.optim, cfg.training.max_steps))
    if state is not None:
        dist_utils.load_optimizer_state(optimizer, train_model, state["optimizer"], env)
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        _set_rng_state(rng[env.rank % len(rng)], device)
    if cfg.training.compile:
        train_model = torch.compile(train_model)

    run_config = to_dict(cfg)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))

    micro = StepBatches(train_blocks, collator, cfg.training.batch_size, cfg.training.grad_accum,
                        env.world_size, env.rank, cfg.training.seed)
    loader = torch.utils.data.DataLoader(
        micro, batch_size=None, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # else creating the iterator draws from the global RNG (dropout's)
        sampler=range(start_step * cfg.training.grad_accum, cfg.training.max_steps * cfg.training.grad_accum))
    valid = _validation_batches(valid_blocks, collator, cfg.training.batch_size, cfg.logging.valid_batches)

    n = cfg.data.block_size
    m = round(cfg.data.pred_prob * n)
    examples_per_step = cfg.training.batch_size * cfg.training.grad_accum * env.world_size
    metrics = MetricsLogger(output_dir, env.is_main, start_step,
                            flops_per_example=estimate_flops_per_example(model.config, n, m),
                            peak_tflops=peak_tflops_for(device))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.training.bf16
                else nullcontext())

    def save(step):
        full_state = dist_utils.full_model_state(train_model, env)  # collective under FSDP
        optim_state = dist_utils.optimizer_state(optimizer, train_model, env)  # collective under FSDP
        rng = dist_utils.gather_rng(_rng_state(device), env)
        if env.is_main:
            to_save = model
            if full_state is not None:  # FSDP: weights are sharded; save an unsharded CPU copy
                to_save = MPNetForPretraining(model.config)
                to_save.load_state_dict(full_state)
                to_save.tie_weights()
            state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng,
                     "tokenizer": meta["tokenizer"]}
            path = save_checkpoint(output_dir, step, to_save, tokenizer, state, run_config, cfg.logging.keep_last)
            metrics.note(f"saved {path}")
        dist_utils.barrier(env)

    train_model.train()
    batches = iter(loader)
    bar = tqdm(total=cfg.training.max_steps, initial=start_step, disable=not (env.is_main and cfg.logging.progress_bar),
               desc="pretrain", unit="step", dynamic_ncols=True)
    for step in range(start_step, cfg.training.max_steps):
        for accum in range(cfg.training.grad_accum):
            batch = _to_device(next(batches), device)
            # Dropout seeded per (seed, step, micro-batch): the same masks whatever the process count.
            torch.manual_seed(_micro_seed(cfg.training.seed, step, accum * env.world_size + env.rank))
            last = accum == cfg.training.grad_accum - 1
            with dist_utils.maybe_no_sync(train_model, env, sync=last), autocast:
                logits = train_model(batch["input_ids"], batch["positions"], batch["pred_size"],
                                     batch["attention_mask"], document_ids=batch.get("document_ids"))
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
            (loss / cfg.training.grad_accum).backward()
            metrics.accumulate(loss.detach(), logits.detach(), batch["targets"])
        max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        metrics.after_step(examples_per_step, n)
        if done % cfg.logging.log_every == 0 or done == cfg.training.max_steps:
            row = metrics.log_train(done, scheduler.get_last_lr()[0], grad_norm, env)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", lr=f"{row['train/lr']:.2e}")
        if valid and (done % cfg.logging.valid_every == 0 or done == cfg.training.max_steps):
            metrics.log_valid(done, evaluate(model, valid, device, autocast), env)
            train_model.train()
        if done % cfg.logging.save_every == 0 or done == cfg.training.max_steps:
            save(done)
    bar.close()
    summary = metrics.summary(output_dir, list_checkpoints(output_dir))
    dist_utils.teardown(env)
    return summary


@torch.no_grad()
def evaluate(model, batches, device, autocast) -> dict:
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for batch in batches:
        batch = _to_device(batch, device)
        with autocast:
            logits = model(batch["input_ids"], batch["positions"], batch["pred_size"], batch["attention_mask"],
                           document_ids=batch.get("document_ids"))
        targets = batch["targets"].flatten()
        loss_sum += F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=-100, reduction="sum")
        valid = targets != -100
        correct += (logits.argmax(-1).flatten() == targets)[valid].sum()
        count += valid.sum()
    count = count.clamp(min=1)
    return {"valid/loss": (loss_sum / count).item(), "valid/accuracy": (correct / count).item()}


def _micro_seed(seed, step, micro) -> int:
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


def _model_overrides(section: dict) -> dict:
    """What a run may change in a checkpoint's config when continuing from it (shapes stay the checkpoint's,
    except a longer position table, which load_pretrained grows explicitly)."""
    keys = ("hidden_dropout_prob", "attention_probs_dropout_prob", "sliding_window_size", "attention_pattern",
            "max_position_embeddings")
    return {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in section.items() if k in keys}
