"""The pretraining loop: data -> two-stream MPNet -> AdamW, with logging, validation and checkpoints.

`training.objective` picks what the model computes from the same batches: mpnet (the default), mlm or
plm (docs/objectives.md); the loss is the cross-entropy on the predicted tokens in every case.

Read top to bottom: `prepare_data` (shards, blocks, collator), `build_model` (fresh, init_from or the
checkpoint being resumed), then `Trainer`: `train_step` is one optimizer step (accumulated micro-batches
through toolkit.OptimizerStep: clipping, the non-finite guard, update) and `train` is the loop around it
(log, validate, save). `pretrain` wires them together: the output-dir lock, the resume contract (resume.py:
which checkpoint, what may change), the one-line report of a full disk.

Determinism is by construction: micro-batch j of optimizer step s is built from the examples at
global offset (s * micro_batches_per_step + j) * batch_size of a seeded per-epoch shuffle, and the
collator's permutation/corruption RNG is seeded from (seed, s, j). So the data position IS the step,
resuming needs no sampler state, and 2 processes see exactly what 1 process with 2 accumulation
steps sees.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ..data import is_preprocessed
from ..errors import UserError
from ..modeling import MPNetForPretraining
from ..modeling.backends import attention_backend
from ..modeling.checkpoint import model_dir, read_config
from ..outputs import write_text_atomic
from . import distributed as dist_utils
from . import toolkit
from .checkpointing import (NO_SPACE, RECENT_VALIDATIONS, check_space, checkpoint_health, health_words,
                            last_good_checkpoint, list_checkpoints, load_training_state, no_space_message,
                            remove_partial_saves, save_checkpoint, tensor_bytes)
from .config import PretrainConfig, model_config, to_dict
from .evaluation import evaluate, fill_mask, fill_mask_batches, untrained_lm_head
from .metrics import (MetricsLogger, check_trackers, estimate_flops_per_example, lm_head_flops, open_trackers,
                      peak_tflops_for)
from .resume import checkpoint_to_resume, config_before_first_checkpoint, resume_config
from .safety import NonFiniteError, OutputDirLock, StopRequest, all_finite, quiet_disk_errors_in_threads

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


@dataclass
class PretrainData:
    meta: dict  # the shards' metadata.json: vocabulary size, special ids, tokenizer identity
    shard_dir: Path
    tokenizer: object
    collator: object
    train_blocks: object
    valid_batches: list
    fill_mask_batches: list  # natural-order blocks with <mask>: the one-stream figure of every run (evaluation.py)


def prepare_data(cfg: PretrainConfig, output_dir: Path, env) -> PretrainData:
    """Shards (rank 0 preprocesses raw text once into OUTPUT/data-cache; the others wait and reuse it),
    their blocks, the collator and the fixed validation batches."""
    from ..data import MPNetCollator, TokenBlocks, load_tokenizer, read_metadata, resolve_data, word_starts

    with dist_utils.rank_zero_first(env):
        shard_dir = resolve_data(cfg.data.path, output_dir / "data-cache", tokenizer=cfg.data.tokenizer,
                                 text_field=cfg.data.text_field, valid_fraction=cfg.data.valid_fraction)
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
                             document_separator_id=meta["eos_token_id"] if cfg.data.document_isolation else None,
                             objective=cfg.training.objective, corrupted_input=cfg.data.corrupted_input)
    valid = _validation_batches(valid_blocks, collator, cfg.training.batch_size, cfg.logging.valid_batches)
    fill = fill_mask_batches(valid_blocks, meta["mask_token_id"], meta["special_token_ids"], meta["pad_token_id"],
                             cfg.training.batch_size, cfg.logging.valid_batches, cfg.data.pred_prob)
    return PretrainData(meta, Path(shard_dir), tokenizer, collator, train_blocks, valid, fill)


def _validation_batches(blocks, collator, batch_size, count):
    count = min(count, math.ceil(len(blocks) / batch_size))
    return [collator([blocks[i] for i in range(b * batch_size, min(len(blocks), (b + 1) * batch_size))],
                     step=b, rank=2**20) for b in range(count)]


# ----------------------------------------------------------------------------------------- model


def build_model(cfg: PretrainConfig, meta: dict, device, resume_from: Path | None = None,
                shard_dir: Path | None = None) -> MPNetForPretraining:
    """The model on `device`: the checkpoint being resumed (its exact shape and weights), else
    `training.init_from` (continued pretraining), else a fresh one of the config's shape (its LM-head bias
    from the token frequencies of `shard_dir` with training.lm_bias_init=unigram)."""
    torch.manual_seed(cfg.training.seed)
    fixed = dict(use_flex_attention=model_config(cfg.model).use_flex_attention, pad_token_id=meta["pad_token_id"],
                 mask_token_id=meta["mask_token_id"])
    source = _starting_weights(cfg, resume_from)
    if source:  # vocabulary first: the data's special ids must fit the checkpoint's table
        _check_vocab(read_config(source).vocab_size, meta, cfg, source, resuming=resume_from is not None)
        overrides = _model_overrides(cfg.model, keys=("attention_backend",) if resume_from else None)
        model = MPNetForPretraining.from_pretrained(source, **fixed, **overrides)
        if resume_from and not all_finite(model.state_dict().values()):  # written before the guard existed
            raise UserError(f"checkpoint {resume_from} holds non-finite weights (NaN/inf); delete it to resume from "
                            "the one before it")
    else:
        if cfg.model.get("vocab_size") is not None:
            _check_vocab(int(cfg.model["vocab_size"]), meta, cfg, None)
        model = MPNetForPretraining(model_config(cfg.model, vocab_size=meta["vocab_size"], **fixed))
        if cfg.training.lm_bias_init == "unigram" and shard_dir is not None:
            with torch.no_grad():
                model.lm_head.bias.copy_(unigram_log_prior(shard_dir, meta))
        if cfg.training.relative_bias_init in LOCALITY_SLOPES:
            with torch.no_grad():
                model.mpnet.encoder.relative_attention_bias.weight.copy_(
                    local_relative_bias(model.config, cfg.training.relative_bias_init))
    if cfg.data.block_size > model.config.max_sequence_length:
        raise UserError(f"data.block_size {cfg.data.block_size} is longer than the position table allows "
                        f"({model.config.max_sequence_length}); lower it or raise model.max_position_embeddings")
    return model.to(device)


UNIGRAM_SAMPLE_TOKENS = 2**25  # the frequencies of the first 32M training tokens are plenty for a prior


def unigram_log_prior(shard_dir: Path, meta: dict) -> torch.Tensor:
    """log p(token) over the vocabulary from the training shard's first tokens (add-one smoothed): what a
    model that ignores its context predicts best, the LM-head bias it would otherwise spend its first
    hundreds of steps learning."""
    tokens = np.memmap(Path(shard_dir) / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    counts = np.bincount(tokens[:UNIGRAM_SAMPLE_TOKENS], minlength=meta["vocab_size"])[: meta["vocab_size"]]
    counts = counts.astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def steep_slopes(heads: int) -> torch.Tensor:
    """1 down to 1/16 across the heads: every head local (at distance 16 the flattest is already at -1)."""
    return 16.0 ** (-torch.arange(heads) / max(heads - 1, 1))


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8 h / H), h = 1..H (Press et al., 2022): the steepest head local, the
    flattest nearly uniform over a 128-token block (-0.5 at the far end), so position 0 can read the whole input."""
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)


LOCALITY_SLOPES = {"local": steep_slopes, "alibi": alibi_slopes}


def local_relative_bias(config, kind: str) -> torch.Tensor:
    """(buckets, heads) table with bias -slope_h x |distance| at each bucket's nearest distance, the slopes of
    `kind` (LOCALITY_SLOPES)."""
    from ..modeling.masks import relative_position_bucket

    buckets, heads = config.relative_attention_num_buckets, config.num_attention_heads
    distance = torch.arange(-config.relative_attention_max_distance, config.relative_attention_max_distance + 1)
    bucket = relative_position_bucket(distance, buckets, config.relative_attention_max_distance)
    nearest = torch.full((buckets,), float(config.relative_attention_max_distance))
    nearest = nearest.scatter_reduce(0, bucket, distance.abs().float(), reduce="amin")
    return -nearest[:, None] * LOCALITY_SLOPES[kind](heads)[None, :]


def _check_backend(cfg: PretrainConfig, device: torch.device):
    """One line, before any data is prepared, when the run's attention backend cannot train on `device` or cannot
    compute its pattern, objective or document isolation (modeling/backends.py says what each backend can)."""
    model = model_config(cfg.model)
    attention_backend(model.attention_backend).check(device, training=True, pattern=model.pattern,
                                                     objective=cfg.training.objective,
                                                     documents=cfg.data.document_isolation)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")  # what load_tokenizer reads


def _starting_weights(cfg: PretrainConfig, resume_from: Path | None) -> Path | None:
    """The checkpoint a run starts from: the one it resumes, else training.init_from (a directory or a Hub name
    in the local cache), else none."""
    return resume_from or (model_dir(cfg.training.init_from) if cfg.training.init_from else None)


def _check_vocab(model_vocab: int, meta: dict, cfg: PretrainConfig, source, resuming: bool = False):
    """One line for a model whose vocabulary is not the data's, with the fix that applies to this input."""
    if model_vocab == meta["vocab_size"]:
        return
    data_path = cfg.data.path
    if source is None:
        where, fix = "model.vocab_size", "drop model.vocab_size: a new model takes the vocabulary of its data"
    elif resuming:
        where = f"the checkpoint {source}"
        fix = (f"the data at {data_path} is no longer tokenized as it was when this run started; point --data at "
               "the run's original data")
    else:
        where = f"training.init_from {source}"
        if not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
            fix = (f"{source} holds no tokenizer files: tokenize the corpus with the tokenizer that checkpoint was "
                   "trained with")
        elif is_preprocessed(data_path):
            fix = (f"--data {data_path} is already tokenized: re-preprocess the corpus with the checkpoint's tokenizer "
                   f"(preprocess-mpnet CORPUS --tokenizer {source} --output-dir NEW_DIR) and pass --data NEW_DIR")
        else:
            fix = f"tokenize the text with the checkpoint's tokenizer: add data.tokenizer={source}"
    raise UserError(f"vocabulary mismatch: {where} has {model_vocab} tokens but the data was tokenized with "
                    f"{meta['tokenizer']} ({meta['vocab_size']} tokens); {fix}")


def _check_vocab_before_preprocessing(cfg: PretrainConfig, resume_from: Path | None):
    """Raw text is tokenized on the fly with data.tokenizer (minutes for a real corpus): a starting checkpoint whose
    vocabulary is not that tokenizer's is refused first, with the line build_model would give after it."""
    from ..data import load_tokenizer

    source = _starting_weights(cfg, resume_from)
    if not source or is_preprocessed(cfg.data.path):
        return
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    meta = {"vocab_size": len(tokenizer), "tokenizer": cfg.data.tokenizer}
    _check_vocab(read_config(source).vocab_size, meta, cfg, source, resuming=resume_from is not None)


def _model_overrides(section: dict, keys=None) -> dict:
    """What a run may change in a checkpoint's config when continuing from it (shapes stay the checkpoint's,
    except a longer position table, which load_pretrained grows explicitly). A resumed run may change only
    the backend (resume.py)."""
    keys = keys or ("hidden_dropout_prob", "attention_probs_dropout_prob", "sliding_window_size",
                    "attention_pattern", "max_position_embeddings", "attention_backend")
    return {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in section.items() if k in keys}


# ------------------------------------------------------------------------------------- the trainer


class Trainer:
    """Optimizer, schedule, data loader and metrics around a built model; `train()` runs the loop."""

    def __init__(self, cfg: PretrainConfig, env, output_dir: Path, data: PretrainData, model, state: dict | None):
        self.cfg, self.env, self.output_dir, self.data, self.model = cfg, env, output_dir, data, model
        self.device = env.device
        self.checkpoint_bytes = _checkpoint_bytes(model, data.shard_dir / "tokenizer")  # full weights: before FSDP
        self.train_model = dist_utils.wrap(model, env, fsdp=cfg.distributed.fsdp)
        opt = cfg.optim
        self.optimizer = toolkit.adamw(self.train_model, opt.lr, opt.betas, opt.eps, opt.weight_decay, self.device)
        self.scheduler = toolkit.lr_scheduler(self.optimizer, opt.warmup_steps, cfg.training.max_steps, opt.schedule,
                                              opt.power, floor=opt.end_lr / opt.lr)
        self.start_step = 0
        self.valid_losses: list[tuple[int, float]] = list(state.get("valid_losses", [])) if state else []
        self.untrained_valid_loss = state.get("untrained_valid_loss") if state else None
        self.stop = StopRequest()  # entered by train(): SIGTERM / SIGUSR1 end the run at a step boundary, saved
        self.stopped_at = None
        if state is not None:
            dist_utils.load_optimizer_state(self.optimizer, self.train_model, state["optimizer"], env)
            self.scheduler.load_state_dict(state["scheduler"])
            self.start_step = state["step"]
            # The lr of the first resumed step, from this run's schedule (its horizon may have moved; else the
            # same product as the saved one, bit for bit).
            for group, base, rule in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                         self.scheduler.lr_lambdas):
                group["lr"] = base * rule(self.start_step)
            toolkit.set_rng_state(state["rng"][env.rank % len(state["rng"])], self.device)
        # The mode the steps run in: "default" when not compiled (training.compile=auto on a CPU)
        self.compile_mode = "default"
        if toolkit.compiles(cfg.training.compile, self.device):
            if cfg.training.compile_mode in toolkit.CUDA_GRAPH_MODES and env.world_size > 1:
                raise UserError(f"training.compile_mode={cfg.training.compile_mode} (CUDA graphs) runs in one "
                                f"process; with {env.world_size} use compile_mode=default")
            self.compile_mode = cfg.training.compile_mode
            scope = cfg.training.compile_scope
            self.train_model = toolkit.compile_model(self.train_model, self.compile_mode, scope)
            log.info("torch.compile: the training model%s (mode %s; the first steps compile)",
                     "'s layers, each in place" if scope == "layers" else "", self.compile_mode)
        self.optimizer_step = toolkit.OptimizerStep(
            self.train_model, self.optimizer, self.scheduler, self.device, cfg.training.bf16, opt.clip_grad_norm,
            cfg.training.max_nonfinite_steps, self.compile_mode, env, skipped=(state or {}).get("skipped_steps", 0))
        self.run_config = to_dict(cfg)
        if env.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_saves(output_dir)
            next_save = min(next_multiple(self.start_step, cfg.logging.save_every), cfg.training.max_steps)
            check_space(output_dir, self.checkpoint_bytes, next_save, last_good_checkpoint(output_dir))
            write_text_atomic(output_dir / "config.yaml", yaml.safe_dump(self.run_config, sort_keys=False))
        self.batches = iter(self._loader())
        n = cfg.data.block_size
        self.examples_per_step = cfg.training.batch_size * cfg.training.grad_accum * env.world_size
        self.metrics = MetricsLogger(output_dir, env.is_main, self.start_step,
                                     flops_per_example=flops_per_example(model.config, cfg.training.objective, n,
                                                                         round(cfg.data.pred_prob * n)),
                                     peak_tflops=peak_tflops_for(self.device),
                                     trackers=open_trackers(cfg.logging.report_to, output_dir, self.run_config)
                                     if env.is_main else ())

    def _loader(self):
        t = self.cfg.training
        micro = StepBatches(self.data.train_blocks, self.data.collator, t.batch_size, t.grad_accum,
                            self.env.world_size, self.env.rank, t.seed)
        return torch.utils.data.DataLoader(
            micro, batch_size=None, num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # else creating the iterator draws from the global RNG (dropout's)
            sampler=range(self.start_step * t.grad_accum, t.max_steps * t.grad_accum))

    def train_step(self, step: int):
        """One optimizer step (toolkit.OptimizerStep, whose non-finite policy it follows): grad_accum
        micro-batches (gradients synced on the last), clip, update. Returns the gradient norm before clipping and
        whether the step was finite (device tensors on CUDA: no host sync here)."""
        cfg, env, stepper = self.cfg, self.env, self.optimizer_step
        loss_sum = 0.0
        stepper.start()
        for accum in range(cfg.training.grad_accum):
            batch = toolkit.to_device(next(self.batches), self.device)
            # Dropout seeded per (seed, step, micro-batch): the same masks whatever the process count.
            torch.manual_seed(_micro_seed(cfg.training.seed, step, accum * env.world_size + env.rank))
            with dist_utils.maybe_no_sync(self.train_model, env, sync=accum == cfg.training.grad_accum - 1):
                logits, loss = stepper.forward(lambda: self._forward(batch))
            stepper.backward(loss, cfg.training.grad_accum)
            loss_sum = loss_sum + loss.detach()
            self.metrics.accumulate(loss.detach(), logits.detach(), batch["targets"])
        return stepper.update(step, loss_sum)

    def _forward(self, batch: dict):
        """(logits, cross-entropy loss on the predicted tokens) of one micro-batch."""
        logits = self.train_model(batch["input_ids"], batch["positions"], batch["pred_size"], batch["attention_mask"],
                                  document_ids=batch.get("document_ids"), objective=self.cfg.training.objective,
                                  appended_ids=batch.get("appended_ids"))
        return logits, F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)

    def train(self) -> dict:
        cfg, max_steps = self.cfg, self.cfg.training.max_steps
        bar = tqdm(total=max_steps, initial=self.start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=None if self.env.is_main and cfg.logging.progress_bar else True)  # None: a terminal only
        with self.stop:
            self._loss_before_training()
            self.train_model.train()
            skipped_before = self.optimizer_step.guard.skipped
            self._loop(bar, max_steps)
        bar.close()
        # Counted after the loop, not per step (`finite` is a device tensor: reading it each step syncs the host).
        self.optimizer_step.poll(self.metrics.note, lambda: last_good_checkpoint(self.output_dir))
        skipped = self.optimizer_step.guard.skipped - skipped_before
        if (self.stopped_at or max_steps) - self.start_step - skipped > 0:
            self.model.untrained_parts = ()  # an update has reached every part (a new LM head included)
        # FSDP shards the weights: a forward on one rank alone would wait for the others
        # ... and a run stopped before its first update from a checkpoint without an LM head has no answers
        answers = (fill_mask(self.model, self.data.tokenizer)
                   if self.env.is_main and not self.env.fsdp and not untrained_lm_head(self.model) else [])
        summary = self.metrics.summary(self.output_dir, list_checkpoints(self.output_dir), fill_mask=answers)
        if self.stopped_at is not None:
            summary["stopped_by"] = self.stop.signal_name
            self.metrics.note(f"pretrain-mpnet: stopped by {self.stop.signal_name} after step {self.stopped_at} "
                              f"(checkpoint saved); continue with: pretrain-mpnet --output-dir {self.output_dir} "
                              "--resume")
        return summary

    def _loop(self, bar, max_steps: int):
        cfg, guard = self.cfg, self.optimizer_step.guard
        for step in range(self.start_step, max_steps):
            grad_norm, finite = self.train_step(step)
            done = step + 1
            bar.update(1)
            self.metrics.after_step(self.examples_per_step, cfg.data.block_size, finite)
            log_now = done % cfg.logging.log_every == 0 or done == max_steps
            save_now = done % cfg.logging.save_every == 0 or done == max_steps
            if log_now or save_now or not guard.on_device:  # raises after N non-finite steps in a row
                self.optimizer_step.poll(self.metrics.note, lambda: last_good_checkpoint(self.output_dir))
            if log_now:
                row = self.metrics.log_train(done, self.scheduler.get_last_lr()[0], grad_norm, self.env,
                                             skipped=guard.skipped)
                if row["train/loss"] is not None:
                    bar.set_postfix(loss=f"{row['train/loss']:.3f}", lr=f"{row['train/lr']:.2e}")
            if self.data.valid_batches and (done % cfg.logging.valid_every == 0 or done == max_steps):
                self.validate(done)
            if save_now:
                self.save(done)
            if done < max_steps and self.stop.requested(self.env, log_step=log_now):  # preempted: save, end
                if not log_now:  # the interval so far gets its row (the resumed run's next row starts after it)
                    self.metrics.log_train(done, self.scheduler.get_last_lr()[0], grad_norm, self.env,
                                           skipped=guard.skipped)
                if not save_now:
                    self.save(done)
                self.stopped_at = done
                break

    def validate(self, step: int):
        values = self.evaluate()
        self.train_model.train()
        self.metrics.log_valid(step, values, self.env)
        self._remember_valid_loss(step, values["valid/loss"])

    def _remember_valid_loss(self, step: int, loss: float):
        """The validations checkpoint_health holds a checkpoint to: the last ones, and this one."""
        self.valid_losses = [*self.valid_losses, (step, loss)][-(RECENT_VALIDATIONS + 1):]

    def _loss_before_training(self):
        """The untrained model's validation loss (no metrics row): the level a checkpoint must not rise above
        even when it is the run's first validation (checkpoint_health)."""
        if self.data.valid_batches and self.start_step == 0:
            self.untrained_valid_loss = self.evaluate()["valid/loss"]

    def health(self, step: int) -> dict:
        """The health of the checkpoint of `step` (checkpointing.checkpoint_health): its validation loss against
        the validations before it, the untrained model's (step 0) among them. A step that was not just
        validated is measured here without a metrics row, so a preempted run logs what the uninterrupted one
        logs."""
        if not self.data.valid_batches:
            return checkpoint_health(None, [])
        if not (self.valid_losses and self.valid_losses[-1][0] == step):
            self._remember_valid_loss(step, self.evaluate()["valid/loss"])
            self.train_model.train()
        return checkpoint_health(self.valid_losses[-1][1], [loss for _, loss in self.valid_losses[:-1]],
                                 untrained=self.untrained_valid_loss)

    def evaluate(self) -> dict:
        return evaluate(self.model, self.data.valid_batches, self.device, self.cfg.training.bf16,
                        self.cfg.training.objective, fill_batches=self.data.fill_mask_batches)

    def save(self, step: int):
        env, model = self.env, self.model
        full_state = dist_utils.full_model_state(self.train_model, env)  # collective under FSDP
        optim_state = dist_utils.optimizer_state(self.optimizer, self.train_model, env)  # collective under FSDP
        rng = dist_utils.gather_rng(toolkit.rng_state(self.device), env)
        health = self.health(step)  # every rank: the evaluation is collective under FSDP
        if env.is_main:
            if full_state is not None:  # FSDP: weights are sharded; save an unsharded CPU copy
                model = MPNetForPretraining(model.config)
                model.load_state_dict(full_state)
                model.tie_weights()
            if not all_finite(model.state_dict().values()):  # never a checkpoint that cannot be resumed
                raise NonFiniteError(f"step {step}: the weights are no longer finite, so no checkpoint was written "
                                     f"(likely cause: optim.lr={self.cfg.optim.lr!r} is too high for this model); "
                                     f"{last_good_checkpoint(self.output_dir)}")
            state = {"step": step, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "rng": rng,
                     "tokenizer": self.data.meta["tokenizer"], "skipped_steps": self.optimizer_step.guard.skipped,
                     "valid_losses": self.valid_losses, "untrained_valid_loss": self.untrained_valid_loss}
            path = save_checkpoint(self.output_dir, step, model, self.data.tokenizer, state, self.run_config,
                                   self.cfg.logging.keep_last, needed_bytes=self.checkpoint_bytes, health=health)
            if health["good"]:
                self.metrics.note(f"saved {path}")
            else:
                self.metrics.note(f"saved {path}, which is NOT a good checkpoint ({health_words(health)}); "
                                  f"{last_good_checkpoint(self.output_dir)}")
        dist_utils.barrier(env)


def flops_per_example(config, objective: str, n: int, m: int) -> float:
    """metrics.estimate_flops_per_example for each objective, its last layer on the m predicted rows only
    (what the model computes): mpnet is its two-stream shape (rows n + 2m, keys n + m); plm has rows
    n + m and keys n, the shape it counts for (n - m, m); mlm is single-stream (n, 0) plus the LM head on
    the m predicted rows."""
    if objective == "mpnet":
        return estimate_flops_per_example(config, n, m, last_layer_rows=m)
    if objective == "plm":
        return estimate_flops_per_example(config, n - m, m, last_layer_rows=m)
    return estimate_flops_per_example(config, n, 0, last_layer_rows=m) + lm_head_flops(config, m)


def _checkpoint_bytes(model, tokenizer_dir: Path) -> int:
    """About what one checkpoint takes: the weights, AdamW's two moments per trainable weight, the tokenizer."""
    weights = tensor_bytes(model.state_dict())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    tokenizer = sum(f.stat().st_size for f in tokenizer_dir.rglob("*") if f.is_file()) if tokenizer_dir.is_dir() else 0
    return weights + moments + tokenizer


def next_multiple(step: int, every: int) -> int:
    """The first multiple of `every` after `step`."""
    return (step // every + 1) * every


def _micro_seed(seed, step, micro) -> int:
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ entry


def pretrain(cfg: PretrainConfig, output_dir, resume: bool = False, requested: dict | None = None,
             resume_from: Path | None = None) -> dict:
    """Train `cfg` into output_dir (checkpoints/, metrics.jsonl, config.yaml, tensorboard/); with `resume`,
    continue from the newest complete checkpoint there, under the contract of resume.py: `requested` holds
    the settings given explicitly (config file, overrides, flags; None: all of `cfg`), and one that conflicts
    with the checkpoint is refused. Returns the summary (also in summary.json)."""
    output_dir = Path(output_dir)
    asked_layout = ((requested or {}).get("data") or {}).get("corrupted_input")
    if asked_layout is not None and cfg.training.objective != "mpnet":
        raise UserError(f"data.corrupted_input={asked_layout} is a layout of the mpnet objective; "
                        f"training.objective={cfg.training.objective} has no appended corrupted entries")
    check_trackers(cfg.logging.report_to)
    env = dist_utils.setup()
    _check_backend(cfg, env.device)
    with OutputDirLock(output_dir) if env.is_main else contextlib.nullcontext():  # one run per directory
        checkpoint = checkpoint_to_resume(output_dir, resume, resume_from)
        state = None
        if checkpoint:
            state = load_training_state(checkpoint)
            cfg = resume_config(cfg, requested, checkpoint, state["step"])
            log.info("resuming from %s (step %d)", checkpoint, state["step"])
        elif resume:
            cfg = config_before_first_checkpoint(cfg, requested, output_dir)
        if cfg.optim.warmup_steps > cfg.training.max_steps and env.is_main:  # fine in a short run resumed longer
            log.warning("optim.warmup_steps %d is longer than training.max_steps %d: the learning rate peaks at "
                        "%.0f%% of optim.lr=%g", cfg.optim.warmup_steps, cfg.training.max_steps,
                        100 * cfg.training.max_steps / cfg.optim.warmup_steps, cfg.optim.lr)
        _check_vocab_before_preprocessing(cfg, checkpoint)
        try:
            with quiet_disk_errors_in_threads():
                data = prepare_data(cfg, output_dir, env)
                cfg = _record_data_tokenizer(cfg, requested, data)
                model = build_model(cfg, data.meta, env.device, resume_from=checkpoint, shard_dir=data.shard_dir)
                cfg = _record_model_shape(cfg, model.config)
                summary = Trainer(cfg, env, output_dir, data, model, state).train()
        except KeyboardInterrupt:  # Ctrl-C: what is kept and how to go on (then the command's "interrupted")
            if env.is_main:
                print(f"pretrain-mpnet: {last_good_checkpoint(output_dir)}; continue with: pretrain-mpnet "
                      f"--output-dir {output_dir} --resume", file=sys.stderr)
            raise
        except OSError as err:  # a full disk outside a checkpoint save (data cache, logs): the same one line
            if err.errno not in NO_SPACE:
                raise
            raise UserError(no_space_message(f"writing {err.filename or output_dir}", output_dir, None,
                                             last_good_checkpoint(output_dir))) from None
    dist_utils.teardown(env)
    return summary


SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings")


def _record_model_shape(cfg: PretrainConfig, config) -> PretrainConfig:
    """config.yaml records the shape of the model that trains: with training.init_from it is the checkpoint's,
    whatever the preset says (a 768 x 12 model was recorded as `preset: tiny`)."""
    return replace(cfg, model={**cfg.model, **{key: getattr(config, key) for key in SHAPE_KEYS}})


def _record_data_tokenizer(cfg: PretrainConfig, requested: dict | None, data: PretrainData) -> PretrainConfig:
    """A preprocessed data directory brings its own tokenizer: a data.tokenizer given with it must be that one
    (same ids), and config.yaml records the directory's copy rather than a name that was never used."""
    from ..data import load_tokenizer, tokenizer_identity

    if not is_preprocessed(cfg.data.path):
        return cfg  # raw text: preprocessed with data.tokenizer, which config.yaml records as given
    asked = ((requested or {}).get("data") or {}).get("tokenizer") if requested is not None else (
        None if cfg.data.tokenizer == "default" else cfg.data.tokenizer)
    if asked is not None and tokenizer_identity(load_tokenizer(asked)) != tokenizer_identity(data.tokenizer):
        raise UserError(f"data.tokenizer={asked} is not the tokenizer {cfg.data.path} was preprocessed with "
                        f"({data.meta['tokenizer']}); leave data.tokenizer out (a preprocessed directory brings its "
                        f"own) or preprocess the corpus again with that tokenizer")
    return replace(cfg, data=replace(cfg.data, tokenizer=str(data.shard_dir / "tokenizer")))
