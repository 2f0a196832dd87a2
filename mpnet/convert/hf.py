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
    report = {"source": str(source), "parameters": model.num_parameters()}
    with conversion_output(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp, tokenizer=tokenizer)
        if verify:
            report["max_abs_diff_vs_transformers"] = _verify(source, tmp)
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s (%d parameters)%s", output_dir, report["parameters"],
             f"; encoder matches transformers' MPNetModel (max |diff| {report['max_abs_diff_vs_transformers']:.1e})"
             if verify else "")
    return report


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
