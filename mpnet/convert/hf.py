"""HF MPNet directory -> native checkpoint. Native already IS an HF directory (MPNetForMaskedLM layout),
so this loads any HF MPNet layout (MPNetForMaskedLM, MPNetModel, sentence-transformers), writes ours, and
verifies the written encoder against transformers' own MPNetModel on the same weights."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


@torch.no_grad()
def convert_hf(source, output_dir, tokenizer_dir=None, verify: bool = True, overwrite: bool = False) -> dict:
    from ..data.tokenizer import checkpoint_tokenizer, load_tokenizer
    from ..modeling import MPNetForPretraining
    from ..modeling.checkpoint import read_state_dict
    from .output import check_conversion_output, conversion_output

    check_conversion_output(output_dir, overwrite)
    source, output_dir = Path(source), Path(output_dir)
    if not source.is_dir():
        raise UserError(f"{source} is not a directory; pass an HF MPNet model directory")
    model = MPNetForPretraining.from_pretrained(source, use_flex_attention=False, sliding_window_size=None).eval()
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else checkpoint_tokenizer(source)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                        f"{model.config.vocab_size}; they do not belong together")
    packaging = sentence_transformers_packaging(source)
    if packaging:  # config.json carries it, so every checkpoint saved from this model writes it again
        model.config.sentence_transformers = packaging
    has_lm_head = any(key.startswith("lm_head.") for key in read_state_dict(source))
    report = {"source": str(source), "parameters": model.num_parameters(),
              "lm_head": "converted" if has_lm_head else "absent in the source: not written (transformers "
                                                         "initialises a new one and says so)",
              "sentence_transformers": sorted(packaging) if packaging else None}
    with conversion_output(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp, tokenizer=tokenizer)
        if not has_lm_head:
            drop_lm_head(tmp)
        if verify:
            report["max_abs_diff_vs_transformers"] = _verify(source, tmp)
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s (%d parameters)%s", output_dir, report["parameters"],
             f"; encoder matches transformers' MPNetModel (max |diff| {report['max_abs_diff_vs_transformers']:.1e})"
             if verify else "")
    return report


# sentence-transformers' own files beside the weights: which modules follow the encoder (pooling, Normalize,
# Dense, ...) and their settings. Small JSON files, kept verbatim.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def sentence_transformers_packaging(source: Path) -> dict[str, str] | None:
    """{relative path: text} of a sentence-transformers model's packaging (None for a plain transformers
    directory): the top-level files above and every JSON file of the modules modules.json lists."""
    if not (source / "modules.json").is_file():
        return None
    files = {name: (source / name).read_text() for name in SENTENCE_TRANSFORMERS_FILES if (source / name).is_file()}
    try:
        modules = json.loads(files["modules.json"])
    except json.JSONDecodeError as err:
        raise UserError(f"{source / 'modules.json'} is not valid JSON ({err})") from None
    for module in modules:
        folder = module.get("path") or ""
        if folder and (source / folder).is_dir():
            for path in sorted((source / folder).rglob("*.json")):
                files[str(path.relative_to(source))] = path.read_text()
    # The sequence limit: newer sentence-transformers keep it only as the tokenizer's model_max_length, which a
    # checkpoint trained further from this one does not keep (it saves its data's tokenizer); sentence_bert_config
    # .json's max_seq_length, which every version reads, keeps it with the packaging.
    settings = json.loads(files.get("sentence_bert_config.json", "{}"))
    if "max_seq_length" not in settings:
        limit = _tokenizer_limit(source)
        if limit is not None:
            files["sentence_bert_config.json"] = json.dumps({**settings, "max_seq_length": limit}, indent=2) + "\n"
    return files


def _tokenizer_limit(source: Path) -> int | None:
    try:
        limit = json.loads((source / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, json.JSONDecodeError):
        return None
    return int(limit) if isinstance(limit, (int, float)) and 0 < limit < 1_000_000 else None


def drop_lm_head(directory: Path):
    """Rewrite a checkpoint without its LM head (weights and architectures): a source without one must not get
    a random head that fill-mask would then answer with, without a word from transformers."""
    from safetensors.torch import load_file, save_file

    weights = directory / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("lm_head.")}
    save_file(state, str(weights), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["MPNetModel"]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _verify(source: Path, written: Path) -> float:
    """The written encoder against transformers' own MPNetModel on the source weights (a padded row included)."""
    import transformers
    from transformers import MPNetModel

    from ..modeling import MPNetForPretraining

    reloaded = MPNetForPretraining.from_pretrained(written).eval()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report lists the pooler/LM-head keys it skips
    try:
        reference = MPNetModel.from_pretrained(str(source), add_pooling_layer=False).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    config = reloaded.config
    gen = torch.Generator().manual_seed(0)
    length = min(32, config.max_sequence_length)
    ids = torch.randint(4, config.vocab_size - 1, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    ids[1, length // 2:] = config.pad_token_id
    ours = reloaded.encode(ids, mask)
    theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    if not diff <= 1e-4:
        raise UserError(f"verification failed: the written encoder differs from transformers' MPNetModel by {diff:.3g}")
    return diff
