"""Every run config, typed, and the one loader: defaults < YAML file < command-line overrides (torchtitan style).

A YAML file maps section names to dicts of fields. Each value is coerced to its field's type when the
config is built (strict booleans, integers that are integers) and range-checked, so a typo or a bad
value fails at once, in one line naming the key, before any data is touched. An unknown section or
field is an error too: a typo never silently falls back to a default.

Runs: `PretrainConfig` (pretrain-mpnet) and `FinetuneConfig` (finetune-mpnet, compare-mpnet-backends).
The model section of pretraining is a preset plus any `MPNetConfig` field, checked against that class.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import UserError
from ..modeling import MPNetConfig
from ..data.collator import CORRUPTED_INPUTS
from ..modeling.model import OBJECTIVES
from .toolkit import COMPILE_MODES, COMPILE_SCOPES, CUDA_GRAPH_MODES, SCHEDULES, scope_fits_mode

log = logging.getLogger(__name__)

REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def config_dir() -> Path:
    """The run configs and GLUE recipes: the installed package's copy (mpnet/configs/ in a wheel: setup.py maps
    configs/ there), else the checkout's configs/ (an editable install or the source tree)."""
    from importlib import resources

    packaged = Path(str(resources.files("mpnet") / "configs"))
    return packaged if packaged.is_dir() else REPO_CONFIG_DIR


def packaged_config_names() -> list[str]:
    root = config_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def config_file(spec) -> Path:
    """--config: a YAML file, or the name of a packaged one (`mpnet-tiny`, `glue/sst2`; `.yaml` optional)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = str(spec).removeprefix("configs/")
    packaged = config_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if packaged.is_file():
        return packaged
    raise UserError(f"config file {spec} does not exist; pass a YAML file or a packaged config: "
                    f"{', '.join(packaged_config_names())}")


# ------------------------------------------------------------------------------------------ values

TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def coerce(value, annotation, key: str):
    """`value` (a YAML value or a command-line string) as `annotation`; UserError naming `key` otherwise."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    optional = type(None) in args
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
    else:
        kinds = [annotation]
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "~"):
        value = None
    if value is None:
        if optional:
            return None
        raise UserError(f"config key '{key}' cannot be empty (null); it takes a {_type_name(kinds[0])}")
    problems = []
    for kind in kinds:
        try:
            return _as(value, kind)
        except (TypeError, ValueError) as err:
            problems.append(str(err))
    allowed = " or ".join(problems) + (" or null" if optional else "")
    raise UserError(f"config key '{key}' got {value!r}; it takes {allowed}")


def _as(value, kind):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in TRUE + FALSE:
            return str(value).strip().lower() in TRUE
        raise ValueError("a boolean (true/false, yes/no, 1/0)")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            if text.lstrip("+-").isdigit():
                return int(text)
            try:
                number = float(text)
            except ValueError:
                raise ValueError("an integer") from None
            if number.is_integer():
                return int(number)
        raise ValueError("an integer")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("a number") from None
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value).strip()
        raise ValueError("a string")
    if kind in (tuple, list) or typing.get_origin(kind) in (tuple, list):
        items = value
        if isinstance(value, str):
            items = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(items, (list, tuple)):
            raise ValueError("a list (e.g. [0.9, 0.98] or 0.9,0.98)")
        return tuple(items) if (kind is tuple or typing.get_origin(kind) is tuple) else list(items)
    if kind is dict:
        if isinstance(value, dict):
            return value
        raise ValueError("a section (a mapping)")
    return value


def check(key: str, value, ok: bool, allowed: str):
    if not ok:
        raise UserError(f"config key '{key}' got {value!r}; it must be {allowed}")


def positive(section: str, config, *names):
    for name in names:
        value = getattr(config, name)
        check(f"{section}.{name}", value, value is None or value > 0, "positive")


# ------------------------------------------------------------------------------------- the loader


def read_yaml(path) -> dict:
    path = config_file(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # 0-based; editors count from 1
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def build(cls, data: dict, where: str = ""):
    """Instantiate a (nested) dataclass from a dict: unknown keys rejected, every value coerced."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"unknown config key '{where}{key}'; known keys: {', '.join(sorted(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"config key '{where}{key}' must be a section (a mapping of keys), got {value!r}")
            kwargs[key] = build(hint, value, f"{where}{key}.")
        else:
            default = _default_of(cls, key)
            if isinstance(default, dict) and isinstance(value, dict):  # model.hidden_size=64 keeps `preset: tiny`
                value = merge(default, value)
            kwargs[key] = coerce(value, hint, f"{where}{key}")
    return cls(**kwargs)


def _default_of(cls, name: str):
    field_ = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field_.default_factory is not dataclasses.MISSING:
        return field_.default_factory()
    return None if field_.default is dataclasses.MISSING else field_.default


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """["optim.lr=1e-4", "model.hidden_size=256"] -> nested dict of strings."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise UserError(f"override '{pair}' must look like SECTION.KEY=VALUE (e.g. optim.lr=1e-4)")
        dotted, value = pair.split("=", 1)
        node = out
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{pair}': '{part}' is a value, not a section")
        node[leaf] = value
    return out


def add_flags(overrides: dict, flags: dict) -> dict:
    """Put the command-line flags that were given (not None) into the nested overrides. A flag and a
    SECTION.KEY=VALUE for the same key must agree (compared as YAML reads the override): one that disagrees is
    refused in one line, never silently dropped."""
    for section, values in flags.items():
        for key, value in values.items():
            if value is None:
                continue
            given = overrides.get(section, {}).get(key) if isinstance(overrides.get(section), dict) else None
            if given is not None and not _same_setting(given, value):
                raise UserError(f"{section}.{key}={given} and its command-line flag ({value}) disagree; give one of them")
            overrides.setdefault(section, {})[key] = value
    return overrides


def _same_setting(override: str, flag) -> bool:
    if str(override) == str(flag):
        return True
    if isinstance(flag, (int, float)) and not isinstance(flag, bool):  # 1e-4 and 0.0001 agree
        try:
            return float(override) == float(flag)
        except ValueError:
            return False
    try:
        return yaml.safe_load(str(override)) == flag
    except yaml.YAMLError:
        return False


def load(cls, path=None, overrides: dict | None = None):
    data = read_yaml(path) if path else {}
    return build(cls, merge(data, overrides or {}))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------- model section

PRESETS = {"tiny": MPNetConfig.tiny, "base": MPNetConfig.base}


@typing.no_type_check
def _model_field_types() -> dict:
    """Type of every MPNetConfig field: our signature's annotations, else the type of HF's default."""
    types = {}
    for key, value in MPNetConfig().to_dict().items():
        if isinstance(value, (bool, int, float, str)):
            types[key] = type(value) if not isinstance(value, float) else float
    hints = typing.get_type_hints(MPNetConfig.__init__)
    for name in inspect.signature(MPNetConfig.__init__).parameters:
        if name in hints and name != "return":
            types[name] = hints[name]
    types["preset"] = str
    return types


def check_model_section(section: dict) -> dict:
    """The model section with its values typed; unknown presets and keys are refused, and the whole
    configuration is built once (with the default vocabulary) so shape errors show now."""
    if not isinstance(section, dict):
        raise UserError(f"config key 'model' must be a section (preset: tiny|base plus MPNetConfig fields), "
                        f"got {section!r}")
    types = _model_field_types()
    typed = {}
    for key, value in section.items():
        if key not in types:
            raise UserError(f"unknown config key 'model.{key}'; it is not a field of MPNetConfig "
                            "(e.g. hidden_size, num_hidden_layers, num_attention_heads, intermediate_size)")
        typed[key] = coerce(value, types[key], f"model.{key}")
    preset = typed.get("preset", "base")
    if preset not in PRESETS:
        raise UserError(f"config key 'model.preset' got {preset!r}; choose one of {', '.join(PRESETS)}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "sliding_window_size"):
        if typed.get(key) is not None:
            check(f"model.{key}", typed[key], typed[key] > 0, "a positive integer")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if key in typed:
            check(f"model.{key}", typed[key], 0 <= typed[key] < 1, "a probability in [0, 1)")
    model_config(typed)
    return typed


def model_config(section: dict, **fixed) -> MPNetConfig:
    """Preset + the section's fields + values fixed by the run (vocabulary, backend)."""
    section = dict(section)
    preset = section.pop("preset", "base")
    if preset not in PRESETS:
        raise UserError(f"unknown model preset '{preset}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset](**{**section, **fixed})


# -------------------------------------------------------------------------------------- pretraining


@dataclass
class DataConfig:
    path: str = "embedded"  # "embedded" (the bundled Austen corpus), raw text / JSONL, a saved HF dataset or shards
    text_field: str = "text"  # the field holding the text in JSONL rows and saved HF datasets
    tokenizer: str = "default"  # "default" (MPNet WordPiece), an HF tokenizer dir, or a sentencepiece .model
    block_size: int = 128  # tokens per training example
    pred_prob: float = 0.15  # fraction of each example that is predicted
    whole_word_mask: bool = False
    document_isolation: bool = False  # attention never crosses the </s> between documents; positions restart
    valid_fraction: float = 0.02
    num_workers: int = 0  # DataLoader workers building batches (0: in the training process)
    # mpnet objective: where the 80/10/10-corrupted predicted tokens go. appended: the original MPNet code's
    # layout, real tokens in the content stream and the corrupted ones as the inputs of both appended
    # sections; content: their content-stream entries, appended entries plain <mask>, which sits at the
    # unigram level ~1,000 steps longer (docs/objectives.md). mlm and plm ignore it.
    corrupted_input: str = "appended"

    def __post_init__(self):
        positive("data", self, "block_size")
        check("data.corrupted_input", self.corrupted_input, self.corrupted_input in CORRUPTED_INPUTS,
              f"one of {', '.join(CORRUPTED_INPUTS)}")
        check("data.pred_prob", self.pred_prob, 0 < self.pred_prob < 1, "a fraction in (0, 1)")
        check("data.valid_fraction", self.valid_fraction, 0 <= self.valid_fraction < 1, "a fraction in [0, 1)")
        check("data.num_workers", self.num_workers, self.num_workers >= 0, "0 or more")
        check("data.block_size", self.block_size, round(self.pred_prob * self.block_size) >= 1,
              "large enough that pred_prob x block_size rounds to at least one predicted token")


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

    def __post_init__(self):
        positive("optim", self, "lr", "eps")
        self.betas = tuple(float(b) for b in self.betas)
        check("optim.betas", list(self.betas), len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              "two numbers in [0, 1)")
        check("optim.weight_decay", self.weight_decay, self.weight_decay >= 0, "0 or more")
        check("optim.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "0 or more")
        check("optim.schedule", self.schedule, self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}")
        check("optim.end_lr", self.end_lr, 0 <= self.end_lr <= self.lr, "between 0 and optim.lr")


def check_compile_mode(compile: bool | str, mode: str, grad_accum: int = 1, scope: str = "model"):
    check("training.compile", compile, isinstance(compile, bool) or compile == "auto", "true, false or auto")
    check("training.compile_mode", mode, mode in COMPILE_MODES, f"one of {', '.join(COMPILE_MODES)}")
    check("training.compile_scope", scope, scope in COMPILE_SCOPES, f"one of {', '.join(COMPILE_SCOPES)}")
    if mode != "default" and compile is False:
        raise UserError(f"training.compile_mode={mode} takes effect with training.compile=true; set both")
    if scope != "model" and compile is False:
        raise UserError(f"training.compile_scope={scope} takes effect with training.compile=true (or auto); set both")
    if not scope_fits_mode(scope, mode):
        raise UserError(f"training.compile_scope=layers compiles each layer on its own; CUDA graphs "
                        f"(compile_mode={mode}) are replayed for the whole model only: use compile_scope=model, or "
                        f"compile_mode=default")
    if mode in CUDA_GRAPH_MODES and grad_accum > 1:
        raise UserError(f"training.compile_mode={mode} replays CUDA graphs, whose outputs (the gradients too) "
                        f"the next micro-batch overwrites: it needs training.grad_accum=1 (got {grad_accum}); "
                        f"raise training.batch_size instead, or use compile_mode=default")


@dataclass
class TrainingConfig:
    max_steps: int = 1000
    batch_size: int = 16  # examples per micro-batch per process
    grad_accum: int = 1
    seed: int = 0
    bf16: bool = True  # autocast on CUDA; ignored on CPU
    # torch.compile the model: true, false, or auto (compiled when training on CUDA, under torchrun too:
    # toolkit.compiles; configs/mpnet-base.yaml says auto)
    compile: bool | str = False
    # its torch.compile mode: default, reduce-overhead / max-autotune (CUDA graphs; grad_accum 1, one
    # process), max-autotune-no-cudagraphs (toolkit.COMPILE_MODES)
    compile_mode: str = "default"
    # what it compiles: "model" (one graph of the training forward) or "layers" (each encoder layer compiled
    # in place, the rest eager, evaluation included: one compile serves all layers; toolkit.COMPILE_SCOPES)
    compile_scope: str = "model"
    init_from: str | None = None  # continue pretraining from this HF MPNet directory
    max_nonfinite_steps: int = 20  # consecutive steps with a non-finite loss/grad norm (skipped) before stopping
    objective: str = "mpnet"  # mpnet | mlm | plm: the original MPNet code's three objectives (docs/objectives.md)
    # A new model's LM-head bias: "unigram" starts it at the log-frequencies of the training tokens, so the
    # first steps need not push every hidden state towards the frequent words (the unigram plateau,
    # docs/bench/dynamics.md); "zero" is HF's and the original's init. Ignored with init_from and on resume.
    lm_bias_init: str = "unigram"
    # A new model's relative-position bias table: "alibi" starts head h with bias -slope_h x |distance|, ALiBi's
    # slopes 2^(-8h/H) (Press et al., 2022), so attention reads the neighbours from the first step while the
    # flattest heads still see the whole block; "local" has steeper slopes (1 down to 1/16: at 128 tokens the
    # steepest head's bias is -128), which pretrains faster at first but leaves position 0 (<s>, what the
    # classifier reads) seeing the first words only, and its checkpoints fine-tune worse than an untrained
    # model (docs/bench/quality.md); "normal" is N(0, initializer_range), HF's and the original's init, with
    # which every objective sits at the unigram level for ~1,000 steps (docs/bench/dynamics.md).
    relative_bias_init: str = "alibi"

    def __post_init__(self):
        positive("training", self, "max_steps", "batch_size", "grad_accum", "max_nonfinite_steps")
        check("training.objective", self.objective, self.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}")
        check("training.lm_bias_init", self.lm_bias_init, self.lm_bias_init in ("unigram", "zero"), "unigram or zero")
        check("training.relative_bias_init", self.relative_bias_init,
              self.relative_bias_init in ("normal", "local", "alibi"), "normal, local or alibi")
        check_compile_mode(self.compile, self.compile_mode, self.grad_accum, self.compile_scope)


@dataclass
class LoggingConfig:
    log_every: int = 10
    valid_every: int = 200
    valid_batches: int = 8
    save_every: int = 500
    keep_last: int = 3  # newest checkpoints kept (0: all)
    progress_bar: bool = True
    report_to: str | None = None  # also log to wandb and/or mlflow (comma-separated; the package must be
    # installed); none (the default) writes metrics.jsonl and tensorboard only

    def __post_init__(self):
        positive("logging", self, "log_every", "valid_every", "save_every")
        from .metrics import TRACKERS  # the one list of trackers

        names = [n.strip() for n in (self.report_to or "none").split(",") if n.strip()]
        known = bool(names) and all(n == "none" or n in TRACKERS for n in names)
        check("logging.report_to", self.report_to, known,
              f"none, {', '.join(TRACKERS)} or a comma-separated list of them")
        check("logging.valid_batches", self.valid_batches, self.valid_batches >= 0, "0 or more")
        check("logging.keep_last", self.keep_last, self.keep_last >= 0, "0 (keep all) or more")


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

    def __post_init__(self):
        self.model = check_model_section(self.model)
        limit = model_config(self.model).max_sequence_length
        check("data.block_size", self.data.block_size, self.data.block_size <= limit,
              f"at most {limit}, the longest input model.max_position_embeddings allows (raise that to go longer)")


# -------------------------------------------------------------------------------------- fine-tuning


@dataclass
class TaskConfig:
    name: str = "sst2"  # a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or "custom"
    text_column: str | None = None  # CSV/JSONL/HF column names (default: the task's own)
    text_pair_column: str | None = None
    label_column: str | None = None
    task_type: str = "classification"  # custom tasks: classification | regression
    labels: list | None = None  # custom classification: label names in index order (default: sorted)
    max_length: int = 128  # tokens per example, special tokens included (truncation beyond)

    def __post_init__(self):
        check("task.max_length", self.max_length, self.max_length >= 8, "at least 8 tokens")
        check("task.task_type", self.task_type, self.task_type in ("classification", "regression"),
              "classification or regression")


@dataclass
class FinetuneTrainingConfig:
    lr: float = 2e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: int = 3
    warmup_ratio: float = 0.06
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    clip_grad_norm: float = 1.0  # <= 0 disables clipping
    max_nonfinite_steps: int = 20  # consecutive steps with a non-finite loss/grad norm (skipped) before stopping
    seed: int = 1
    max_train_examples: int | None = None  # a fixed random subset (seed `subset_seed`), for quick runs
    max_eval_examples: int | None = None
    subset_seed: int = 0
    pad_to_multiple_of: int = 64
    # Pack each step's examples into rows of <= task.max_length tokens (document isolation) instead of
    # padding every example to the longest; batch_size and eval_batch_size still count examples.
    pack: bool = False
    # Packed batches get a multiple of this many rows (rows of padding only): fewer distinct shapes,
    # fewer FlexAttention compiles. None: the backend's packed_rows_multiple (modeling/backends.py).
    pack_rows_multiple: int | None = None
    bf16: bool = True  # autocast on CUDA; ignored on CPU
    # torch.compile the training forward (evaluation stays eager). Each padded width is a shape; after
    # the second one dynamo compiles one graph for all widths. Eager steps are host-bound at fine-tuning
    # sizes (an H200 mpnet-base step at 32 x 128: 50.2 ms for 11.5 ms of GPU kernels, docs/benchmarks.md);
    # compiled ones launch far fewer kernels. true, false or auto (compiled on CUDA: toolkit.compiles).
    compile: bool | str = False
    compile_mode: str = "default"  # as training.compile_mode of pretraining (CUDA graphs: one per padded width)
    compile_scope: str = "model"  # as training.compile_scope of pretraining ("layers": evaluation runs them too)
    # Attention-probability dropout (None: the checkpoint's). FlexAttention applies none, so backend
    # comparisons with identical regularisation set it to 0.
    attention_dropout: float | None = None
    log_every: int = 20  # optimizer steps between tensorboard train scalars
    progress_bar: bool = True

    def __post_init__(self):
        positive("training", self, "lr", "batch_size", "eval_batch_size", "epochs", "pad_to_multiple_of",
                 "log_every", "max_train_examples", "max_eval_examples", "pack_rows_multiple", "max_nonfinite_steps")
        check_compile_mode(self.compile, self.compile_mode, scope=self.compile_scope)
        check("training.warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1, "a fraction in [0, 1)")
        if self.attention_dropout is not None:
            check("training.attention_dropout", self.attention_dropout, 0 <= self.attention_dropout < 1,
                  "a probability in [0, 1)")


@dataclass
class FinetuneConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    training: FinetuneTrainingConfig = field(default_factory=FinetuneTrainingConfig)


def load_finetune_config(task_name: str, path=None, overrides: dict | None = None) -> FinetuneConfig:
    """defaults < configs/glue/<task>.yaml (or the given file) < overrides."""
    recipe = config_dir() / "glue" / f"{task_name}.yaml"
    if path is None and recipe.is_file():
        path = recipe
        log.info("using the recipe in %s", path)
    overrides = dict(overrides or {})
    overrides.setdefault("task", {})["name"] = task_name
    return load(FinetuneConfig, path, overrides)
