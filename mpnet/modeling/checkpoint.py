"""HF-format checkpoints: `config.json` + `model.safetensors` with transformers' MPNet key names.

Our module tree already uses HF's names, so saving is the state dict minus the tied decoder weight, and
loading accepts the prefixes transformers writes (`MPNetForMaskedLM`: "mpnet." + "lm_head.";
`MPNetModel` / sentence-transformers: no prefix, plus a pooler we do not use).

A model transformers' own MPNet does not compute (a sliding window, an attention pattern, another
bucket distance: `MPNetConfig.matches_transformers_mpnet`) is written as model_type PATTERN_MODEL_TYPE with an auto_map
and a shim file naming the classes of mpnet/hub.py (the pattern-checkpoint format below), so transformers
loads it only with trust_remote_code=True, into our classes. Both model types read back here alike.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..outputs import write_file_atomic, write_text_atomic
from .config import PATTERN_MODEL_TYPE, MPNetConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_TIED = ("lm_head.decoder.weight", "lm_head.decoder.bias")
_IGNORED_PREFIXES = ("mpnet.pooler.", "pooler.")
_IGNORED_KEYS = ("mpnet.embeddings.position_ids", "embeddings.position_ids")
_HEAD_PREFIXES = ("lm_head.", "classifier.")
_MODEL_TYPES = ("mpnet", PATTERN_MODEL_TYPE)
# what config.json says about the file (which classes read it, which transformers wrote it), not about
# the model: save_pretrained derives them again from the model's own fields
_FILE_FORMAT_KEYS = ("model_type", "transformers_version", "auto_map")


class CheckpointError(UserError):
    """A checkpoint directory that cannot be read (missing, truncated, or not an MPNet model)."""


# ------------------------------------------------------------------------ the pattern-checkpoint format
# What save_pretrained writes beside a model transformers' own MPNet does not compute: the config under
# PATTERN_MODEL_TYPE, an auto_map naming classes in SHIM_FILE, and SHIM_FILE itself, a few lines subclassing
# the classes of mpnet/hub.py (which says what transformers does with such a directory). hub.py builds its
# auto classes from PATTERN_CLASSES, so a class named here and missing there fails its import.

SHIM_MODULE = "modeling_mpnet_pattern"
SHIM_FILE = SHIM_MODULE + ".py"
PATTERN_CLASSES = {  # transformers' auto class -> the class of mpnet/hub.py (and of the shim) it loads
    "AutoConfig": "MPNetPatternConfig",
    "AutoModel": "MPNetPatternModel",
    "AutoModelForMaskedLM": "MPNetPatternForMaskedLM",
    "AutoModelForSequenceClassification": "MPNetPatternForSequenceClassification",
}
AUTO_MAP = {auto: f"{SHIM_MODULE}.{name}" for auto, name in PATTERN_CLASSES.items()}


# transformers turns every config class into a dataclass, and one that defines no __init__ of its own
# gets a generated one that skips MPNetConfig's: transformers' MPNet defaults (layer_norm_eps 1e-12,
# 512 positions), none of our checks. So each config subclass here and in the shim names ours.
class MPNetPatternConfig(MPNetConfig):
    """Our config under its own model_type, so that transformers' MPNet classes never claim it."""

    model_type = PATTERN_MODEL_TYPE
    __init__ = MPNetConfig.__init__


_SHIM_DOCSTRING = '''"""MPNet whose attention transformers' own MPNet does not compute (mpnet/hub.py).

A sliding window, an attention pattern, or relative buckets saturating at another distance than 128:
transformers' MPNet would compute a different function from these weights. The classes below are the
`mpnet` package's, which must be installed; load with trust_remote_code=True, e.g.
AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).
"""
'''


def shim_source() -> str:
    """SHIM_FILE's text. Its classes subclass hub.py's under the same names rather than import them: then
    transformers' own save_pretrained of a model loaded from it copies this file (the module its class
    comes from), and every auto_map entry still points at a file in the new directory."""
    def body(auto: str, name: str) -> str:
        if auto == "AutoConfig":  # see MPNetPatternConfig
            return f"__init__ = hub.{name}.__init__  # not the dataclass __init__ transformers would generate"
        return "pass"

    classes = "".join(f"\n\nclass {name}(hub.{name}):\n    {body(auto, name)}\n"
                      for auto, name in PATTERN_CLASSES.items())
    return _SHIM_DOCSTRING + "from mpnet import hub\n" + classes


# ------------------------------------------------------------------------------------ saving, reading


def save_pretrained(model, path, tokenizer=None):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in _TIED}
    write_file_atomic(path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    config = model.config
    config.architectures = [model.hf_architecture]
    shim = path / SHIM_FILE
    plain = config.matches_transformers_mpnet
    if not plain:
        write_text_atomic(shim, shim_source())  # before the config names it
        config = MPNetPatternConfig(**_model_fields(config.to_dict()), auto_map=AUTO_MAP)
    write_file_atomic(path / CONFIG_NAME, lambda tmp: config.to_json_file(str(tmp)))
    if plain:
        shim.unlink(missing_ok=True)  # left by a pattern model saved here before; no longer named
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    for name, text in (getattr(model.config, "sentence_transformers", None) or {}).items():  # convert/hf.py
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)


def model_dir(spec) -> Path:
    """A model given as transformers resolves it: a local directory, else a Hub id (`microsoft/mpnet-base`) that
    is in the local Hugging Face cache. Nothing is downloaded here (these machines train offline; with
    HF_HUB_OFFLINE unset, `huggingface-cli download ID` fetches it first). Anything else is one line."""
    path = Path(spec).expanduser()
    if path.exists() or str(spec).count("/") != 1 or str(spec).startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(spec), local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise CheckpointError(f"{spec} is neither a directory nor a Hub model in the local Hugging Face cache "
                              f"(HF_HOME / HF_HUB_CACHE); download it first: huggingface-cli download {spec}") from None


def read_config(path, **overrides) -> MPNetConfig:
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a model directory: it has no {CONFIG_NAME}")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err}); the checkpoint is corrupt") from None
    if data.get("model_type") not in _MODEL_TYPES:
        raise CheckpointError(f"{path} holds a {data.get('model_type')!r} model, not an MPNet one")
    if "use_flex_attention" in overrides and "attention_backend" not in overrides:
        data.pop("attention_backend", None)  # the flag chooses between dense and flex, over the saved choice
    data.update(overrides)
    return MPNetConfig(**_model_fields(data))


def _model_fields(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in _FILE_FORMAT_KEYS}


def read_state_dict(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    safetensors_file, bin_file = path / WEIGHTS_NAME, path / "pytorch_model.bin"
    try:
        if safetensors_file.is_file():
            return load_file(str(safetensors_file))
        if bin_file.is_file():
            return torch.load(bin_file, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"cannot read the weights in {path} ({err}); the checkpoint is truncated or corrupt") from None
    raise CheckpointError(f"{path} has no {WEIGHTS_NAME} (or pytorch_model.bin)")


def to_our_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map transformers' MPNet key layouts onto ours; drop the pooler and tied copies."""
    out = {}
    for key, value in state.items():
        if key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES) or key in _TIED:
            continue
        if not key.startswith(("mpnet.",) + _HEAD_PREFIXES):
            key = "mpnet." + key
        out[key] = value
    return out


POSITION_KEY = "mpnet.embeddings.position_embeddings.weight"


def _grow_position_table(state, config, path):
    """Loading a 512-position checkpoint into a longer model (max_position_embeddings raised on purpose).

    The learned rows are kept and the new ones are copies of them, repeated (Longformer's choice: each
    new position starts from a trained embedding rather than noise; the relative bias needs nothing, it
    saturates at max_distance). Rows 0-1 (padding_idx and the one before it) are not repeated.
    A shorter table than the checkpoint's is refused: it would silently drop trained positions.
    """
    table = state.get(POSITION_KEY)
    if table is None or table.shape[0] == config.max_position_embeddings:
        return
    if table.shape[0] > config.max_position_embeddings:
        raise CheckpointError(f"{path} has {table.shape[0]} positions but max_position_embeddings is "
                              f"{config.max_position_embeddings}; shrinking a trained position table is not supported")
    learned = table[2:]
    repeats = -(-(config.max_position_embeddings - 2) // learned.shape[0])
    state[POSITION_KEY] = torch.cat([table[:2], learned.repeat(repeats, 1)])[: config.max_position_embeddings]
    log.info("%s: position table grown from %d to %d rows by repeating the learned positions", path,
             table.shape[0], config.max_position_embeddings)


def load_pretrained(cls, path, **config_overrides):
    config = read_config(path, **config_overrides)
    model = cls(config)
    state = to_our_keys(read_state_dict(path))
    _grow_position_table(state, config, path)
    expected = {k for k in model.state_dict() if k not in _TIED}
    missing = sorted(expected - state.keys())
    missing_backbone = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    if missing_backbone:
        raise CheckpointError(f"{path} lacks encoder weights (e.g. {missing_backbone[0]}); it is not a complete MPNet checkpoint")
    for key in sorted(expected & state.keys()):
        if state[key].shape != model.state_dict()[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, the config implies "
                                  f"{tuple(model.state_dict()[key].shape)}")
    model.load_state_dict({k: state[k] for k in expected & state.keys()}, strict=False)
    # What the checkpoint lacks is newly initialised: untrained until training updates it (fill-mask refuses a
    # model whose LM head is one of these: training/evaluation.py).
    model.untrained_parts = tuple(sorted({k.split(".")[0] for k in missing}))
    if missing:
        log.info("%s: newly initialised (not in the checkpoint): %s", path, ", ".join(model.untrained_parts))
    unused = sorted({k.split(".")[0] for k in state.keys() - expected})
    if unused:
        log.info("%s: weights not used by %s: %s", path, cls.__name__, ", ".join(unused))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
