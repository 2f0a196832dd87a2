"""Training-step benchmarks: one optimizer step of a whole model (forward, loss, backward, AdamW).

- `step`: mpnet-base pretraining (two streams, cross-entropy on the m = round(0.15 n) predicted
  tokens) with each attention backend, beside two BERT-base MLM steps (HF `BertForMaskedLM`, SDPA) of
  the same batch and length: as the class runs (its MLM head on every row) and with the head on the
  masked rows only (MosaicBERT / ModernBERT practice, the yardstick: what a careful user would run);
  optionally at several micro-batch sizes (`batch_sizes`).
- `finetune`: mpnet-base sequence classification at batch 32 x 128: transformers'
  `MPNetForSequenceClassification` (the same config, random weights; eager attention, it has no SDPA
  path) beside ours with each backend: what a user would pick instead for fine-tuning.

Both optionally break the step's GPU time down by kernel family (`profile`, torch.profiler).
Model FLOPs are matmul FLOPs, forward + backward = 3 x forward, counted by
`mpnet.training.metrics.estimate_flops_per_example` for MPNet (the count training logs its MFU with)
and by `bert_step_flops` for BERT; tests/bench/test_flops.py checks them against torch's FlopCounterMode,
and every step cell also reports the MFU of torch's own count (`counted_step_flops`) beside it.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..modeling.backends import ATTENTION_BACKEND_NAMES, ATTENTION_BACKENDS
from ..modeling.config import MPNetConfig
from ..training.metrics import estimate_flops_per_example
from ..training.config import FinetuneTrainingConfig, OptimConfig
from ..training.toolkit import COMPILE_MODES, COMPILE_SCOPES, OptimizerStep, adamw, compile_model, scope_fits_mode
from .harness import (
    check_counts,
    check_dtype,
    check_kernel_options,
    configure_dynamo,
    flex_kernel_options,
    kernel_ms_per_call,
    phase,
    time_runs,
    timer_text,
)
from .problems import pred_size
from .report import Section, Table, fmt, ok, tflops_text, time_text

STEP_BACKENDS = ATTENTION_BACKEND_NAMES  # MPNetConfig.attention_backend
FINETUNE_MODELS = ("transformers",) + STEP_BACKENDS
BERT_MODELS = ("bert-sparse", "bert")  # MLM head on the masked rows only (the reference) / on every row
REFERENCE_STEP = "sparse-head BERT step time"
STEP_MODELS = BERT_MODELS + STEP_BACKENDS  # what `also_compile` may name in the step section
MODEL_SIZES = ("base", "tiny")
# AdamW as in the project's run configs: pretraining (optim section) and fine-tuning (its defaults).
PRETRAINING_ADAMW = dict(betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
FINETUNING_ADAMW = dict(betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
# ... and their gradient clipping (the default of each config)
PRETRAINING_CLIP, FINETUNING_CLIP = OptimConfig.clip_grad_norm, FinetuneTrainingConfig.clip_grad_norm


@dataclass
class TrainingStepSettings:
    """The knobs of both step sections (the same names, so one CLI flag sets both); each section's own
    defaults where they differ."""

    seq_len: int = 512
    batch_size: int = 32
    compile: bool = False  # torch.compile every cell
    # Cells run once more under torch.compile, after the others: rows "+compile", each compared with the
    # compiled reference (BERT, transformers) when that ran.
    also_compile: list = field(default_factory=list)
    compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead (CUDA graphs) | max-autotune...
    compile_scope: str = "model"  # what it compiles: the whole model, or each repeated layer (toolkit.COMPILE_SCOPES)
    peak_tflops: float = 989.0  # H100/H200 SXM dense bf16 (datasheet)
    dtype: str = "bf16"
    device: str | None = None
    model: str = "base"  # "base" (mpnet-base, BERT-base) or "tiny" (smoke runs)
    warmup: int = 3
    repeats: int = 10
    max_seconds: float = 20.0
    lr: float = 1e-4
    seed: int = 0
    flex_kernel_options: dict | None = None
    profile: bool = False  # break each step's GPU time down by kernel family (torch.profiler)


@dataclass
class StepSettings(TrainingStepSettings):
    backends: list = field(default_factory=lambda: list(STEP_BACKENDS))
    bert: bool = True
    # The micro-batch sweep: every cell once per batch size (empty: batch_size alone).
    batch_sizes: list = field(default_factory=list)
    # These MPNet backends' cells once more with the last layer on every row (rows "all rows"): the price of
    # the rows the loss never reads, which the model's last layer skips.
    also_all_rows: list = field(default_factory=list)

    def validate(self, device: torch.device):
        check_common(self, device, self.backends, STEP_BACKENDS, "--backend")
        check_also_compile(self.also_compile, STEP_MODELS, self.compile_mode, self.compile_scope)
        unknown = [b for b in self.also_all_rows if b not in self.backends]
        if unknown:
            raise UserError(f"--also-all-rows {','.join(unknown)}: not among the MPNet backends run "
                            f"({','.join(self.backends)})")
        if any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise UserError(f"--batch-sizes takes positive integers, got {self.batch_sizes}")


@dataclass
class FinetuneSettings(TrainingStepSettings):
    seq_len: int = 128  # a classification step's defaults
    repeats: int = 20
    max_seconds: float = 10.0
    lr: float = 2e-5
    models: list = field(default_factory=lambda: list(FINETUNE_MODELS))
    num_labels: int = 2

    def validate(self, device: torch.device):
        check_common(self, device, self.models, FINETUNE_MODELS, "--models")
        check_also_compile(self.also_compile, FINETUNE_MODELS, self.compile_mode, self.compile_scope)
        if self.num_labels < 1:
            raise UserError("--num-labels must be >= 1")


def check_common(settings, device, chosen, choices, flag):
    check_kernel_options(settings.flex_kernel_options)
    check_dtype(settings.dtype, device)
    unknown = [b for b in chosen if b not in choices]
    if unknown or not chosen:
        raise UserError(f"unknown {flag} {unknown or '(none)'}; pick from {', '.join(choices)}")
    if settings.batch_size < 1 or settings.seq_len < 8:
        raise UserError("--batch-size must be >= 1 and --seq-len >= 8")
    if settings.model not in MODEL_SIZES:
        raise UserError(f"--model must be one of {', '.join(MODEL_SIZES)}")
    limit = MPNetConfig.base().max_sequence_length
    if settings.seq_len > limit:
        raise UserError(f"--seq-len {settings.seq_len} is longer than mpnet-base's position table allows ({limit})")
    check_counts(settings, "peak_tflops")
    refusals = [ATTENTION_BACKENDS[b].refusal(device, training=True) for b in chosen if b in ATTENTION_BACKENDS]
    if any(refusals):  # a step is forward and backward: each backend must train here
        raise UserError(f"{flag}: " + "; ".join(filter(None, refusals)))


def check_also_compile(chosen, choices, mode="default", scope="model"):
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown --compile-mode '{mode}'; pick from {', '.join(COMPILE_MODES)}")
    if scope not in COMPILE_SCOPES:
        raise UserError(f"unknown --compile-scope '{scope}'; pick from {', '.join(COMPILE_SCOPES)}")
    if not scope_fits_mode(scope, mode):
        raise UserError(f"--compile-scope {scope} compiles each layer on its own; CUDA graphs (--compile-mode {mode}) "
                        "are replayed for the whole model only: use --compile-scope model, or --compile-mode default")
    unknown = [name for name in chosen if name not in choices]
    if unknown:
        raise UserError(f"unknown --also-compile {unknown}; pick from {', '.join(choices)}")


def compile_plan(names, compiled_too, every: bool) -> list:
    """(name, compiled) in run order: every name as asked (all compiled with `every`), then the
    `compiled_too` ones again compiled, in `names` order (so BERT / transformers come first)."""
    return [(name, every) for name in names] + [(name, True) for name in names if name in compiled_too and not every]


# -------------------------------------------------------------------------------------------- FLOPs


def bert_step_flops(config, batch, length, head_rows=None) -> float:
    """HF BertForMaskedLM, same convention: per layer q/k/v/o and the FFN on all L rows and 4 L^2 h of
    attention; the MLM head (transform + decoder) on `head_rows` rows (default all L: the class's own
    loss; the masked ones for the sparse-head BERT)."""
    h, f, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    layer = 2 * length * (4 * h * h + 2 * h * f) + 4 * length * length * h
    head = 2 * (length if head_rows is None else head_rows) * (h * h + h * v)
    return 3.0 * batch * (layers * layer + head)


def counted_step_flops(build, batch: int) -> float:
    """torch's own count (FlopCounterMode) of one forward + backward of the cell's model, built at batch 1
    by `build(batch_size=1)` and scaled by `batch` (every count is linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, loss_fn, _, _ = build(batch_size=1)
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    del model
    return float(counter.get_total_flops()) * batch


def finetune_flops_per_example(config, length) -> float:
    """Single-stream encoding of `length` tokens plus the classification head (dense + out_proj) on
    the <s> row; the same for transformers' MPNet and ours."""
    h = config.hidden_size
    return estimate_flops_per_example(config, length, 0) + 3.0 * 2 * (h * h + h * config.num_labels)


# ------------------------------------------------------------------------------------------- models


def mpnet_config(settings, **overrides) -> MPNetConfig:
    return (MPNetConfig.base if settings.model == "base" else MPNetConfig.tiny)(**overrides)


def backend_name(model) -> str:
    """The attention module the model's layers run, by class name (e.g. FlexTwoStreamAttention)."""
    return f"{type(model.mpnet.encoder.layer[0].attention.attn).__name__} ({model.config.attention_backend})"


def every_row_in_last_layer(model):
    """The model with its last layer computing all n + 2m rows, the m predicted ones sliced off after: what
    the forward did before it computed those m alone (timing only; the loss is the same function)."""
    encoder = model.mpnet.encoder
    forward = encoder.forward

    def all_rows(*args, first_row: int = 0, **kwargs):
        return forward(*args, first_row=0, **kwargs)[:, first_row:]
    encoder.forward = all_rows
    return model


def pretraining_step(settings: StepSettings, backend: str, device, compiled: bool = False, all_rows: bool = False):
    """(model, loss_fn, flops, what): mpnet two-stream pretraining on random tokens, one random
    permutation per sequence, no padding, the m predicted tokens corrupted to <mask>; all_rows: the last
    layer on every row (`every_row_in_last_layer`)."""
    from ..modeling.model import MPNetForPretraining

    config = mpnet_config(settings, attention_backend=backend)
    gen = torch.Generator().manual_seed(settings.seed)
    batch, n = settings.batch_size, settings.seq_len
    m = pred_size(n)
    model = MPNetForPretraining(config).to(device).train()
    if all_rows:
        every_row_in_last_layer(model)
    ids = torch.randint(3, config.mask_token_id, (batch, n), generator=gen)  # no <s>, <pad>, </s>, <mask>
    targets = ids[:, n - m:].clone()
    ids[:, n - m:] = config.mask_token_id
    positions = torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)])
    ids, targets, positions = ids.to(device), targets.to(device), positions.to(device)
    forward = compile_model(model, settings.compile_mode, settings.compile_scope) if compiled else model

    def loss_fn():
        logits = forward(ids, positions, m)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    flops = estimate_flops_per_example(config, n, m, last_layer_rows=None if all_rows else m)
    return model, loss_fn, batch * flops, backend_name(model)


class MaskedRowsBertMLM(torch.nn.Module):
    """BertForMaskedLM's encoder and MLM head with the head on the masked rows only (MosaicBERT,
    ModernBERT): what a careful user runs, the yardstick of the step section."""

    def __init__(self, bert_for_mlm):
        super().__init__()
        self.bert, self.cls = bert_for_mlm.bert, bert_for_mlm.cls

    def forward(self, input_ids, rows):
        """(B, L) ids, (B, m) masked positions -> (B, m, vocab) logits."""
        hidden = self.bert(input_ids=input_ids).last_hidden_state
        return self.cls(hidden.gather(1, rows[:, :, None].expand(-1, -1, hidden.shape[-1])))


def bert_step(settings: StepSettings, device, compiled: bool = False, sparse_head: bool = False):
    """HF BertForMaskedLM with SDPA, 15% of the tokens predicted, no attention_mask (no padding: SDPA runs
    unmasked). Loss from the model (its MLM head runs on every row: what a user of that class pays), or
    with `sparse_head` from `MaskedRowsBertMLM` (the head on the masked rows only)."""
    import transformers

    sizes = {} if settings.model == "base" else dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=512)
    config = transformers.BertConfig(**sizes)
    model = transformers.BertForMaskedLM._from_config(config, attn_implementation="sdpa").to(device).train()
    gen = torch.Generator().manual_seed(settings.seed)
    batch, n = settings.batch_size, settings.seq_len
    m = pred_size(n)
    ids = torch.randint(1000, config.vocab_size, (batch, n), generator=gen)
    labels = torch.full_like(ids, -100)
    chosen = torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(batch)])
    labels.scatter_(1, chosen, ids.gather(1, chosen))
    ids.scatter_(1, chosen, 103)  # [MASK]
    ids = ids.to(device)
    what = f"HF BertForMaskedLM, attn_implementation={model.config._attn_implementation}"
    if sparse_head:
        targets, chosen = labels.gather(1, chosen).to(device), chosen.to(device)
        model = MaskedRowsBertMLM(model)
        forward = compile_model(model, settings.compile_mode, settings.compile_scope) if compiled else model
        loss_fn = lambda: F.cross_entropy(forward(ids, chosen).float().flatten(0, 1), targets.flatten())  # noqa: E731
        return model, loss_fn, bert_step_flops(config, batch, n, head_rows=m), what + ", MLM head on masked rows"
    labels = labels.to(device)
    forward = compile_model(model, settings.compile_mode, settings.compile_scope) if compiled else model
    return model, lambda: forward(input_ids=ids, labels=labels).loss, bert_step_flops(config, batch, n), what


def finetune_step(settings: FinetuneSettings, which: str, device, compiled: bool = False):
    """(model, loss_fn, flops, what): sequence classification on random tokens, no padding, random labels."""
    import transformers

    from ..modeling.model import MPNetForSequenceClassification

    backend = "dense" if which == "transformers" else which
    config = mpnet_config(settings, num_labels=settings.num_labels, attention_backend=backend)
    gen = torch.Generator().manual_seed(settings.seed)
    batch, n = settings.batch_size, settings.seq_len
    ids = torch.randint(5, config.mask_token_id, (batch, n), generator=gen).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, settings.num_labels, (batch,), generator=gen).to(device)
    torch.manual_seed(settings.seed)
    if which == "transformers":  # our config is a transformers.MPNetConfig: the same model, HF's code
        model = transformers.MPNetForSequenceClassification(config).to(device).train()
        forward = compile_model(model, settings.compile_mode, settings.compile_scope) if compiled else model
        logits = lambda: forward(input_ids=ids, attention_mask=mask).logits  # noqa: E731
        what = f"transformers MPNetForSequenceClassification ({model.config._attn_implementation} attention)"
    else:
        model = MPNetForSequenceClassification(config).to(device).train()
        forward = compile_model(model, settings.compile_mode, settings.compile_scope) if compiled else model
        logits = lambda: forward(ids, attention_mask=mask)  # noqa: E731
        what = f"ours, {backend_name(model)}"
    loss_fn = lambda: F.cross_entropy(logits().float(), labels)  # noqa: E731
    return model, loss_fn, batch * finetune_flops_per_example(config, n), what


# ------------------------------------------------------------------------------------------ timing


def time_training_step(settings, model, loss_fn, optimizer_args: dict, clip_grad_norm: float, device, timer) -> dict:
    """Time one optimizer step as the training loops take it (toolkit.OptimizerStep): forward in autocast, loss,
    backward, gradient clipping, the non-finite guard, AdamW (toolkit: fused on CUDA), zero_grad; the first step
    compiles and allocates the optimizer state. A skipped (non-finite) step fails the cell: it is not the step
    measured."""
    optimizer = adamw(model, settings.lr, device=device, **optimizer_args)
    stepper = OptimizerStep(model, optimizer, None, device, settings.dtype == "bf16", clip_grad_norm,
                            max_nonfinite_steps=1, compile_mode=settings.compile_mode, lr_name="--lr", warmup_name=None)
    losses = []
    # The first step's wall time by part, each ended by a device sync: where a compiled step's first-step time goes
    # (the forward graph's compile, the backward's, the optimizer's first state).
    first_parts: dict = {}

    def step(parts: dict | None = None):
        started = time.perf_counter()

        def done(part):
            nonlocal started
            if parts is not None:
                timer.sync()
                parts[part] = time.perf_counter() - started
                started = time.perf_counter()

        stepper.start()
        with phase("forward"):
            loss = stepper.forward(loss_fn)
        done("forward")
        with phase("backward"):
            stepper.backward(loss)
        done("backward")
        with phase("optimizer"):
            stepper.update(len(losses), loss.detach())
        done("optimizer")
        losses.append(loss.detach().clone())  # a clone: a CUDA-graph output is overwritten by the next replay

    result = time_runs(timer, step, settings.warmup - 1, settings.repeats, settings.max_seconds,
                       first=lambda: step(first_parts))
    result["first_step_parts_s"] = first_parts
    stepper.poll(note=print)  # max_nonfinite_steps=1: the first skipped step raises NonFiniteError (the cell FAILs)
    last = float(losses[-1])
    result.update(loss=last, optimizer="AdamW (fused)" if device.type == "cuda" else "AdamW",
                  params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    if settings.profile and device.type == "cuda":
        try:
            result["profile"] = kernel_breakdown(step)
        except Exception as exc:  # noqa: BLE001 - the timing above stands without the breakdown
            result["profile_error"] = f"{type(exc).__name__}: {exc}"
    return result


def rates(result: dict, flops: float, tokens: int, examples: int, settings, device) -> dict:
    seconds = result["ms"] / 1e3
    result.update(flops=flops, tokens=tokens, tokens_per_s=tokens / seconds, examples_per_s=examples / seconds,
                  gflop_per_token=flops / tokens / 1e9, tflops=flops / seconds / 1e12)
    result["mfu"] = result["tflops"] / settings.peak_tflops if device.type == "cuda" else None
    if "counted_flops" in result:  # torch's FlopCounterMode count of the same step
        result["mfu_counted"] = (result["counted_flops"] / seconds / 1e12 / settings.peak_tflops
                                 if device.type == "cuda" else None)
    return result


# Kernel families, matched on the CUDA kernel's name (first match wins). The flex kernels are inductor
# templates ("triton_tem_fused_..."), SDPA's are FlashAttention's; the GEMM families cover cuBLAS/CUTLASS.
KERNEL_FAMILIES = (
    ("flex attention (fwd+bwd)", ("flex_attention", "triton_tem_")),
    ("SDPA flash attention", ("flash", "fmha", "cudnn")),
    ("matmul (GEMM)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("optimizer (AdamW)", ("adam",)),
    ("softmax / dropout", ("softmax", "dropout", "bernoulli")),
    ("reductions / index (incl. bias gather)", ("reduce", "index", "embedding", "gather", "scatter", "sort")),
)
OTHER_KERNELS = "other (elementwise, norms, copies)"
# The triton backend's kernels (mpnet/modeling/triton_kernels.py): Triton names a kernel after its
# function, so these match whole names only.
TRITON_ATTENTION_KERNELS = ("triton attention (fwd+bwd)",
                            {"_forward_kernel", "_key_gradients_kernel", "_query_gradients_kernel", "_delta_kernel"})


def kernel_family(name: str) -> str:
    if name in TRITON_ATTENTION_KERNELS[1]:
        return TRITON_ATTENTION_KERNELS[0]
    lowered = name.lower()
    return next((family for family, needles in KERNEL_FAMILIES if any(n in lowered for n in needles)), OTHER_KERNELS)


def kernel_breakdown(step, steps: int = 3, top: int = 8) -> dict:
    """GPU kernel time per step by family and the top kernels, from torch.profiler over `steps` steps:
    the evidence of where a step's time goes (which is what a missed target must be explained by)."""
    kernels = kernel_ms_per_call(step, steps)
    families = {}
    for name, ms in kernels.items():
        families[kernel_family(name)] = families.get(kernel_family(name), 0.0) + ms
    return {"gpu_ms_per_step": sum(families.values()),
            "families": sorted(([f, ms] for f, ms in families.items()), key=lambda item: -item[1]),
            "top_kernels": sorted(([k[:90], ms] for k, ms in kernels.items()), key=lambda item: -item[1])[:top]}


# -------------------------------------------------------------------------------------------- cells


def build_step(settings: StepSettings, which: str, device, compiled: bool = False, all_rows: bool = False,
               **overrides):
    """(model, loss_fn, flops, what) of a step cell; `overrides` replace settings fields (batch_size=1 for
    torch's count)."""
    settings = dataclasses.replace(settings, **overrides)
    if which in BERT_MODELS:
        return bert_step(settings, device, compiled, sparse_head=which == "bert-sparse")
    return pretraining_step(settings, which, device, compiled, all_rows)


def measure_pretraining(settings: StepSettings, which: str, compiled: bool, device, timer, all_rows=False) -> dict:
    with phase("build"):
        model, loss_fn, flops, what = build_step(settings, which, device, compiled, all_rows)
    result = time_training_step(settings, model, loss_fn, PRETRAINING_ADAMW, PRETRAINING_CLIP, device, timer)
    result["attention"] = what
    del model, loss_fn
    # MPNet counted with the dense backend: the flex and triton kernels are opaque to the counter, and every
    # backend computes the same function (the parity tests). A failed count leaves the timing standing.
    counted_as = which if which in BERT_MODELS else "dense"
    try:
        with phase("count"):
            result["counted_flops"] = counted_step_flops(functools.partial(build_step, settings, counted_as, device,
                                                                           all_rows=all_rows), settings.batch_size)
    except Exception as exc:  # noqa: BLE001 - the column says n/a, the note why
        result["counted_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return rates(result, flops, settings.batch_size * settings.seq_len, settings.batch_size, settings, device)


def measure_finetune(settings: FinetuneSettings, which: str, compiled: bool, device, timer) -> dict:
    with phase("build"):
        model, loss_fn, flops, what = finetune_step(settings, which, device, compiled)
    result = time_training_step(settings, model, loss_fn, FINETUNING_ADAMW, FINETUNING_CLIP, device, timer)
    result["attention"] = what
    return rates(result, flops, settings.batch_size * settings.seq_len, settings.batch_size, settings, device)


def relative_to(section: Section, keys: list, metric: str, label: str, measure):
    """measure() plus `metric` relative to the first of the section's `keys` cells that ran: step time
    over BERT's (below 1 = faster than BERT), or examples/s over transformers' (above 1 = faster)."""
    def measured():
        result = measure()
        for key in keys:
            reference = next((c for c in section.cells if c["key"] == key and ok(c)), None)
            if reference is not None:
                compiled = " (compiled)" if reference["compile"] else ""
                result["relative"] = [result[metric] / reference[metric], label + compiled]
                break
        return result
    return measured


def references(reference: str, compiled: bool) -> list:
    """The reference cells of a (compiled) cell, best match first: compiled with compiled, else eager."""
    return [reference + "+compile", reference] if compiled else [reference]


def run_step(session, settings: StepSettings, deadline=None) -> Section:
    """Per batch size of the sweep: the BERTs first (the sparse-head one is the reference of every ratio, the
    all-rows one included), then MPNet with each backend, then the `also_compile` cells."""
    device = session.device
    settings.validate(device)
    section = Section("step", f"Pretraining step ({settings.model} models, {settings.dtype})", settings,
                      step_method, step_tables)
    session.open(section)
    configure_dynamo()
    names = (list(BERT_MODELS) if settings.bert else []) + list(settings.backends)
    with flex_kernel_options(settings.flex_kernel_options):
        for batch in settings.batch_sizes or [settings.batch_size]:
            at_batch = dataclasses.replace(settings, batch_size=batch)
            plan = compile_plan(names, settings.also_compile, settings.compile)
            plan = [(which, compiled, False) for which, compiled in plan] + [
                (which, compiled, True) for which, compiled in plan if which in settings.also_all_rows]
            for which, compiled, all_rows in plan:
                torch._dynamo.reset()
                model, backend = (("BERT", "sdpa" + which[4:]) if which in BERT_MODELS else ("MPNet", which))
                name = which if which in BERT_MODELS else f"mpnet-{which}"
                variant = ("+compile" if compiled else "") + ("+all-rows" if all_rows else "")
                cell = {"key": f"{name}{variant}@{batch}", "name": f"{model + '-' + settings.model:<11} {backend:<11}"
                        + (" +compile" if compiled else "") + (" all rows" if all_rows else "") + f" B={batch}",
                        "model": f"{model}-{settings.model}", "backend": backend, "batch": batch,
                        "seq_len": settings.seq_len, "m": pred_size(settings.seq_len), "compile": compiled,
                        "all_rows": all_rows}
                measure = functools.partial(measure_pretraining, at_batch, which, compiled, device, session.timer,
                                            all_rows)
                keys = ([] if which == "bert-sparse"
                        else [f"{ref}@{batch}" for ref in references("bert-sparse", compiled)])
                session.measure(section, cell, relative_to(section, keys, "ms", REFERENCE_STEP, measure), deadline)
    session.finish(section)
    return section


def run_finetune(session, settings: FinetuneSettings, deadline=None) -> Section:
    """transformers' model first (the reference), then ours with each backend, then the `also_compile` ones."""
    device = session.device
    settings.validate(device)
    section = Section("finetune", f"Fine-tuning step: sequence classification ({settings.model} models, "
                      f"{settings.dtype})", settings, finetune_method, finetune_tables)
    session.open(section)
    configure_dynamo()
    with flex_kernel_options(settings.flex_kernel_options):
        for which, compiled in compile_plan(settings.models, settings.also_compile, settings.compile):
            torch._dynamo.reset()
            suffix = "+compile" if compiled else ""
            name = "transformers" if which == "transformers" else "ours " + which
            cell = {"key": which + suffix, "name": f"{name:<14}" + (" +compile" if compiled else ""), "model": which,
                    "batch": settings.batch_size, "seq_len": settings.seq_len, "compile": compiled}
            measure = functools.partial(measure_finetune, settings, which, compiled, device, session.timer)
            session.measure(section, cell, relative_to(section, references("transformers", compiled), "examples_per_s",
                                                       "transformers examples/s", measure), deadline)
    session.finish(section)
    return section


# ------------------------------------------------------------------------------------------ reports


def common_columns(c: dict, settings) -> list:
    good = ok(c)
    return [
        time_text(c, ".1f"),
        fmt(c.get("examples_per_s"), ",.1f") if good else "",
        fmt(c.get("tokens_per_s"), ",.0f") if good else "",
        tflops_text(c.get("tflops")) if good else "",
        (fmt(100 * c["mfu"], ".1f") if c.get("mfu") is not None else "n/a") if good else "",
        fmt(c.get("peak_gib"), ".2f", "n/a") if good else "",
        f"{c['relative'][0]:.2f}x" if good and c.get("relative") else "",
        first_step_text(c) if good else "",
    ]


def first_step_text(c: dict) -> str:
    """The first step's seconds, and for a compiled cell its forward / backward parts (the two graphs' compiles)."""
    parts = c.get("first_step_parts_s") or {}
    if not c.get("compile") or not parts:
        return fmt(c.get("first_call_s"), ".1f")
    return f"{c['first_call_s']:.1f} (fwd {parts['forward']:.1f}, bwd {parts['backward']:.1f})"


def common_headers(settings, relative: str) -> list:
    return ["step ms median [p20, p80]", "examples/s", "tokens/s", "TFLOP/s", f"MFU % (peak {settings.peak_tflops:g})",
            "peak GiB", relative, "first step s"]


def step_tables(section: Section) -> list:
    settings = section.settings

    def counted_mfu(c):
        return (fmt(100 * c["mfu_counted"], ".1f") if c.get("mfu_counted") is not None else "n/a") if ok(c) else ""

    rows = [[c["model"], c["backend"] + (" +compile" if c["compile"] else "") + (" all rows" if c.get("all_rows") else ""),
             f"{c['batch']}x{c['seq_len']}",
             fmt(c.get("params_m"), ".1f") if ok(c) else "", fmt(c.get("gflop_per_token"), ".2f") if ok(c) else ""]
            + common_columns(c, settings)[:5] + [counted_mfu(c)] + common_columns(c, settings)[5:]
            for c in section.cells]
    headers = common_headers(settings, "x " + REFERENCE_STEP)
    headers = (["model", "attention", "batch x len", "params M", "GFLOP/token"] + headers[:5]
               + ["MFU % counted (FlopCounterMode)"] + headers[5:])
    return [Table(headers, rows)] + last_layer_tables(section.cells) + compile_phase_tables(section.cells) + \
        profile_tables(section.cells)


# torch's compile phases that only wrap others (the whole of dynamo's, AOT autograd's or inductor's compile): left
# out of the table, whose top rows would otherwise all be these; the json keeps every phase.
WRAPPING_PHASES = {"_compile.compile_inner", "compile_attempt_0", "OutputGraph.call_user_compiler",
                   "create_aot_dispatcher_function", "compile_fx_inner", "fx_codegen_and_compile",
                   "GraphLowering.compile_to_fn", "GraphLowering.compile_to_module", "compile_file",
                   "backward._backward_impl"}


def compile_phase_tables(cells, top: int = 6) -> list[Table]:
    """Where each compiled cell's first step went: torch's compile phases (harness.compile_phases), longest first."""
    def phases(c):
        inner = [(name, s) for name, s in c["compile_phases_s"].items() if name not in WRAPPING_PHASES]
        return "; ".join(f"{name} {s:.1f}" for name, s in inner[:top])

    rows = [[c["name"].strip(), fmt(c.get("first_call_s"), ".1f"), phases(c)]
            for c in cells if ok(c) and c.get("compile") and c.get("compile_phases_s")]
    notes = ["torch's own records of its compile phases during the first step (`torch._dynamo.utils` "
             "dynamo_timed phases of 0.5 s or more), longest first, without those that only wrap others (the json "
             "has them all); they still nest: e.g. the forward graph's compile (fw_compiler_base) includes its "
             "code generation and the wait for its kernels' compiles (async_compile.wait)."]
    return [Table(["cell", "first step s", f"compile phases, s (top {top})"], rows, notes=notes,
                  title="Where the compiled cells' first step went")] if rows else []


def last_layer_tables(cells) -> list[Table]:
    """--also-all-rows: each all-rows cell beside the same cell as the model runs (the last layer on the m
    predicted rows): the step time saved by skipping the rows the loss never reads."""
    rows = []
    for c in cells:
        same = next((o for o in cells if c.get("all_rows") and o["key"] == c["key"].replace("+all-rows", "")), None)
        if same is not None and ok(c) and ok(same):
            rows.append([c["backend"] + (" +compile" if c["compile"] else ""), f"{c['batch']}x{c['seq_len']}",
                         fmt(c["ms"], ".1f"), fmt(same["ms"], ".1f"), f"{100 * (1 - same['ms'] / c['ms']):.1f}%"])
    headers = ["attention", "batch x len", "last layer on all rows: step ms", "on the m predicted rows: step ms",
               "saved"]
    return [Table(headers, rows, title="The last layer's rows the loss never reads (--also-all-rows)")] if rows else []


def finetune_tables(section: Section) -> list:
    settings = section.settings
    rows = [[c["model"] + (" +compile" if c["compile"] else ""), c.get("attention", ""), f"{c['batch']}x{c['seq_len']}",
             fmt(c.get("params_m"), ".1f") if ok(c) else ""] + common_columns(c, settings) for c in section.cells]
    headers = ["model", "implementation", "batch x len", "params M"] + common_headers(settings, "x transformers examples/s")
    return [Table(headers, rows)] + compile_phase_tables(section.cells) + profile_tables(section.cells)


def profile_tables(cells) -> list[Table]:
    """Where each model's step time goes on the GPU: its kernel families, then its top kernels."""
    tables = []
    for c in cells:
        prof = c.get("profile")
        if not prof:
            continue
        total = prof["gpu_ms_per_step"]
        title = (f"Where the step time goes, {c['name'].strip()}: GPU kernel time per step {total:.1f} ms (step "
                 f"{c['ms']:.1f} ms; torch.profiler, CUDA kernels, mean of 3 steps)")
        tables += [Table(["kernel family", "ms / step", "share"], [[family, f"{ms:.2f}", f"{100 * ms / total:.1f}%"]
                                                                   for family, ms in prof["families"]], title),
                   Table(["top kernels", "ms / step"], [[f"`{k}`", f"{ms:.2f}"] for k, ms in prof["top_kernels"]])]
    return tables


def timing_line(settings) -> str:
    return (f"- One optimizer step per timed run: forward in {settings.dtype}"
            + (" autocast" if settings.dtype == "bf16" else "") + ", loss, backward, gradient clipping and "
            "the non-finite guard (toolkit.OptimizerStep, the step of the training loops), AdamW (toolkit.adamw: "
            "no decay on 1-d parameters, fused kernel on CUDA), zero_grad; median [p20, p80] of up to "
            f"{settings.repeats} steps ({timer_text(settings)}) after "
            f"{settings.warmup} warm-up steps (the first compiles and allocates the optimizer state); peak GiB = "
            "max_memory_allocated over one step.")


def flops_line(settings, rest: str) -> str:
    return ("- Model FLOPs are matmul FLOPs, forward + backward = 3 x forward (no recompute counted), checked "
            "against torch's FlopCounterMode: " + rest + f" MFU = achieved TFLOP/s / {settings.peak_tflops:g} "
            "(--peak-tflops; 989 = H100/H200 SXM dense bf16).")


def compile_line(reference: str, mode: str, scope: str = "model") -> str:
    what = "the model" if scope == "model" else "each of its repeated layers compiled in place (the rest eager)"
    return (f"- \"+compile\": the same cell with {what} under `torch.compile` (mode {mode}; the triton backend's "
            f"kernels are opaque torch.library ops in the graph), its ratio taken against the compiled {reference} "
            f"cell when that ran, else the eager one; \"first step s\" includes the compile, and for a compiled cell "
            f"its forward and backward parts (each ended by a device sync).")


def step_lines(s, reference: str, optimizer: str) -> list:
    """The method's first lines in both step sections: the timed step with its optimizer, the compiled cells."""
    return [timing_line(s) + " " + optimizer] + ([compile_line(reference, s.compile_mode, s.compile_scope)]
                                                  if s.compile or s.also_compile else [])


def step_method(section: Section) -> list:
    s = section.settings
    return step_lines(s, "sparse-head BERT", "AdamW betas 0.9/0.98, eps 1e-6, weight decay 0.01; gradient norm clipped at "
                      f"{PRETRAINING_CLIP:g}.") + [
            f"- MPNet: `MPNetForPretraining` ({s.model} config), two streams (n + 2m rows, m = round(0.15 n)), "
            "cross-entropy on the m predicted tokens; random token ids, one random permutation per sequence, no padding.",
            f"- BERT: `transformers.BertForMaskedLM` ({s.model} config, attn_implementation=\"sdpa\"), the same batch "
            "and length, 15% of the tokens predicted, no attention_mask (no padding), twice: `sdpa-sparse` with the "
            "MLM head on the masked rows only (`MaskedRowsBertMLM`: MosaicBERT / ModernBERT practice, the "
            "reference), `sdpa` with the loss from the model (its MLM head on every row, what a user of that class "
            f"pays). The sparse-head one runs first: \"x {REFERENCE_STEP}\" = step time / its step time at the "
            "same batch (below 1 = faster).",
            *([f"- all rows (--also-all-rows {','.join(s.also_all_rows)}): those MPNet cells once more with the last "
               "layer computing all n + 2m rows and the m predicted ones sliced off after (`every_row_in_last_layer`), "
               "as the model did before it computed those m alone: their step time against the same cell's is "
               "what skipping the rows the loss never reads saves (their FLOPs count that layer on all rows)."]
              if s.also_all_rows else []),
            flops_line(s, "per sequence and layer MPNet does q, o and the FFN on n + 2m rows (in the last layer on "
                          "the m query rows only, all the loss reads), k and v on the n + m content rows and "
                          "4 (n+2m)(n+m) h of attention (the last layer 4 m (n+m) h), plus its LM head on the m query "
                          "rows "
                          "(`estimate_flops_per_example`, the count training reports MFU with); BERT does "
                          "2 L (4h^2 + 2hf) + 4 L^2 h per layer and its MLM head on all L rows (sdpa) or "
                          "on the masked ones (sdpa-sparse). tokens/s counts the B x L input tokens. \"MFU % "
                          "counted\": the same with torch's FlopCounterMode count of one forward + backward of the "
                          "cell's model at batch 1 times the batch (`counted_step_flops`; MPNet counted with the "
                          "dense backend, whose matmuls the counter sees).")]


def finetune_method(section: Section) -> list:
    s = section.settings
    return step_lines(s, "transformers", "AdamW betas 0.9/0.98, eps 1e-6, weight decay 0.1, gradient norm "
                      f"clipped at {FINETUNING_CLIP:g} (the fine-tuning defaults).") + [
            f"- The same model: transformers' `MPNetForSequenceClassification` built from our config "
            f"({s.model}, {s.num_labels} labels, dropout 0.1, random weights; eager attention: it has no SDPA "
            "path), and ours with each attention backend (flex and triton apply no attention dropout). Random "
            "token ids, no padding (attention_mask all ones), random labels, cross-entropy on the logits in fp32. "
            "transformers runs first: \"x transformers\" = examples/s over its examples/s (above 1 = faster).",
            flops_line(s, "single-stream encoding of the n tokens (`estimate_flops_per_example` with m = 0) plus "
                          "the classification head on the <s> row, the same for every model.")]
