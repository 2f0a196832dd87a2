"""What `--resume` takes from the checkpoint and what the command line may still change (docs/resume.md).

A resumed run continues the checkpoint's run: the losses go on exactly as an uninterrupted run's would.
That fixes everything the weights, the optimizer state and the data position depend on. The rest (how
long to train, how to log, save and validate, how to run) may change. A value the user asked for that
conflicts with the checkpoint is refused in one line naming the key: it is never silently dropped.

"Asked for" means given explicitly: in the --config file, as SECTION.KEY=VALUE, or as a flag. Keys left
at their defaults are not requests, so `pretrain-mpnet --output-dir R --resume` needs no config at all.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from ..errors import UserError
from ..modeling.checkpoint import CheckpointError, read_config
from . import toolkit
from .checkpointing import STATE_FILE, checkpoint_problem, checkpoint_root, list_checkpoints
from .config import PretrainConfig, build, to_dict

log = logging.getLogger("mpnet.pretrain")

# May differ from the checkpoint's run: none of them changes what the next step computes from the data.
CHANGEABLE = {
    "training": {"max_steps", "bf16", "compile", "compile_mode", "compile_scope", "max_nonfinite_steps"},
    "logging": {"log_every", "valid_every", "valid_batches", "save_every", "keep_last", "progress_bar"},
    "data": {"num_workers"},
    "distributed": {"fsdp"},
    "model": {"use_flex_attention", "attention_backend"},  # every backend computes the same function
}
PATH_KEYS = {("data", "path"), ("data", "tokenizer"), ("training", "init_from")}
WHY = {
    "model": "the model's shape and behaviour are the checkpoint's",
    "optim": "the optimizer and its schedule continue from the checkpoint's state",
    "data": "the data position of a step is defined by the checkpoint's data settings",
    "training": "the global batch, the seed and the starting weights are the checkpoint's",
}
# Runs whose run config predates data.corrupted_input trained the "content" layout, the default until the
# original MPNet code's "appended" replaced it: resuming them keeps "content".
LAYOUT_BEFORE_THE_KEY = "content"
WHY_KEY = {("training", "objective"): "the run optimises the checkpoint's objective (docs/objectives.md)"}


def run_config_of(checkpoint: Path) -> PretrainConfig:
    file = Path(checkpoint) / STATE_FILE.parent / "run_config.yaml"
    if not file.is_file():
        raise UserError(f"{checkpoint} has no {file.name}; it was not written by pretrain-mpnet and cannot be resumed")
    saved = yaml.safe_load(file.read_text()) or {}
    if isinstance(saved.get("data"), dict):  # written before the key existed: the layout it trained with
        saved["data"].setdefault("corrupted_input", LAYOUT_BEFORE_THE_KEY)
    try:
        return build(PretrainConfig, saved)
    except UserError as err:
        raise UserError(f"{file} is not a valid run config ({err}); it cannot be resumed") from None


def leaves(tree: dict, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,)


def _same(a, b, key) -> bool:
    if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def resume_config(cfg: PretrainConfig, requested: dict | None, checkpoint: Path, step: int) -> PretrainConfig:
    """The config a resumed run really uses: the checkpoint's, with the requested changeable keys applied.
    `requested`: the explicitly given settings (nested dict); None means every key of `cfg` was asked for."""
    # the checkpoint's true shape (a grown position table included)
    fix = (f"start a new run from the checkpoint's weights (training.init_from={checkpoint} and a new --output-dir)")
    return _apply_requests(cfg, requested, run_config_of(checkpoint), read_config(checkpoint).to_dict(), checkpoint,
                           step, fix)


def config_before_first_checkpoint(cfg: PretrainConfig, requested: dict | None, output_dir: Path) -> PretrainConfig:
    """--resume of a run stopped before its first checkpoint: its own config.yaml (not the defaults), under the
    same rules as a checkpoint's; `cfg` itself when the directory has no config.yaml (nothing ran there)."""
    file = Path(output_dir) / "config.yaml"
    if not file.is_file():
        return cfg
    try:
        saved = build(PretrainConfig, yaml.safe_load(file.read_text()) or {})
    except (UserError, yaml.YAMLError) as err:
        raise UserError(f"{file} is not a valid run config ({str(err).splitlines()[0]}); fix it or start a new "
                        "--output-dir") from None
    from .config import model_config

    model_now = model_config(saved.model).to_dict()
    log.info("--resume: no checkpoint in %s yet; starting again from its config.yaml", output_dir)
    return _apply_requests(cfg, requested, saved, model_now, file, 0, "choose a new --output-dir", owner="run's")


def _apply_requests(cfg: PretrainConfig, requested: dict | None, saved: PretrainConfig, model_now: dict, source: Path,
                    step: int, fix: str, owner: str = "checkpoint's") -> PretrainConfig:
    """`saved` (read from `source`) with the requested changeable keys of `cfg` applied; a requested fixed key
    that differs is refused in one line ending with `fix`."""
    requested_dict = to_dict(cfg) if requested is None else requested
    wanted, base = to_dict(cfg), to_dict(saved)
    checkpoint = source
    for path in leaves(requested_dict):
        if len(path) != 2:
            continue  # the loader already refused anything that is not SECTION.KEY
        section, key = path
        value = wanted[section][key] if section != "model" else cfg.model.get(key)
        if key in CHANGEABLE.get(section, ()):
            base[section][key] = value
            continue
        if section == "model":
            old = saved.model.get("preset", "base") if key == "preset" else model_now.get(key)
        else:
            old = base[section][key]
        if not _same(value, old, path):
            why = WHY_KEY.get(path, WHY.get(section, "it is fixed by the checkpoint"))
            raise UserError(
                f"--resume: {section}.{key}={value!r} conflicts with the {owner} {old!r} ({checkpoint}): "
                f"{why}. Drop it, or {fix}; see docs/resume.md")
    resumed = build(PretrainConfig, base)
    if resumed.training.max_steps <= step:
        raise UserError(f"--resume: training.max_steps (--max-steps) is {resumed.training.max_steps}, at or below the "
                        f"checkpoint's step {step} ({checkpoint}): nothing to train; pass a larger --max-steps")
    _note_schedule_change(saved, resumed, step)
    return resumed


def _note_schedule_change(saved: PretrainConfig, resumed: PretrainConfig, step: int):
    before, after = saved.training.max_steps, resumed.training.max_steps
    if before == after:
        return
    o = saved.optim
    lr = [o.lr * toolkit.lr_multiplier(step, o.warmup_steps, m, o.schedule, o.power, o.end_lr / o.lr)
          for m in (before, after)]
    log.info("--resume: training.max_steps %d -> %d: the learning-rate schedule now ends at step %d "
             "(lr at step %d: %.3g -> %.3g)", before, after, after, step, lr[0], lr[1])


# ------------------------------------------------------------------------------ which checkpoint


def resume_target(output_dir: Path | None, resume) -> tuple[Path, Path | None]:
    """(the run directory, the checkpoint to resume from or None for the newest) from --output-dir and --resume
    [PATH]. PATH may be the run directory or one of its checkpoints; --output-dir, when given too, must be
    that run."""
    if resume in (None, False, True):
        if output_dir is None:
            raise UserError("--output-dir is required (or --resume RUN_DIR)")
        return Path(output_dir), None
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        run, checkpoint = path.parent.parent, path
    elif (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        run, checkpoint = path, None
    else:
        raise UserError(f"--resume {resume}: not a run directory (no checkpoints/ or config.yaml) nor a checkpoint "
                        f"(no {STATE_FILE})")
    if output_dir is not None and Path(output_dir).resolve() != run.resolve():
        raise UserError(f"--resume {resume} belongs to the run {run}, not to --output-dir {output_dir}; a run "
                        "continues in its own directory (to start a new one from its weights: training.init_from)")
    return run, checkpoint


def checkpoint_to_resume(output_dir: Path, resume: bool, chosen: Path | None = None) -> Path | None:
    """The checkpoint a run in output_dir starts from: `chosen` (--resume PATH) or the newest with --resume, None
    without (refused when the directory already holds checkpoints) or when there is none yet."""
    checkpoints = list_checkpoints(output_dir)
    if chosen is not None:  # going back: the newer checkpoints would be overwritten or rotated away
        chosen_step = next((step for step, path in checkpoints if path.resolve() == chosen.resolve()), None)
        if chosen_step is None:
            raise UserError(f"--resume {chosen} is not one of the checkpoints in {checkpoint_root(output_dir)}")
        newer = [path for step, path in checkpoints if step > chosen_step]
        if newer:
            raise UserError(f"--resume {chosen}: {len(newer)} newer checkpoint(s) are in the run ({newer[-1].name} "
                            f"the newest); move them out of {checkpoint_root(output_dir)} to go back to "
                            f"{chosen.name} (nothing was changed)")
        checkpoints = [(step, path) for step, path in checkpoints if step <= chosen_step]
    if not resume:
        if checkpoints:
            raise UserError(f"{output_dir} already holds checkpoints; pass --resume to continue that run, "
                            "or choose another --output-dir (nothing was overwritten)")
        return None
    if not checkpoints:
        log.info("--resume: no checkpoint under %s yet, starting from scratch", output_dir)
        return None
    (step, newest), earlier = checkpoints[-1], checkpoints[:-1]
    problem = checkpoint_problem(newest)
    if problem is not None:  # a copy cut short, a disk error: the user decides; nothing is deleted here
        previous = next(((s, p) for s, p in reversed(earlier) if checkpoint_problem(p) is None), None)
        offer = (f"delete it (or move it away) to resume from step {previous[0]} ({previous[1]})" if previous
                 else "no earlier checkpoint can be resumed from either")
        raise CheckpointError(f"the newest checkpoint, step {step} ({newest}), is truncated or corrupt ({problem}); "
                              f"{offer}")
    return newest
