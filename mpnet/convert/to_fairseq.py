"""Our checkpoint -> the ORIGINAL fairseq MPNet checkpoint format (microsoft/MPNet, pretraining/fairseq).

The exact inverse of fairseq.py's reader, so ours -> fairseq -> ours is bit-exact:

- `dict.txt`: fairseq's rows 0-3 (<s> <pad> </s> <unk>) are our tokens of special_row_ids; dict.txt lists every
  other token in our id order; the mask token comes last, where masked_permutation_lm's
  `dictionary.add_symbol('<mask>')` puts it (so it is not in dict.txt). Model rows without a token (a vocabulary
  padded beyond the tokenizer) become fairseq's own padding words, madeupword0000... With the bundled MPNet
  tokenizer this is the released layout: dict.txt is the BERT vocabulary in BERT order and fairseq id == our id.
- `checkpoint.pt`: `model` holds decoder.sentence_encoder.* (embed_tokens, embed_positions, emb_layer_norm,
  relative_attention_bias, layers.{i}.self_attn.in_proj_weight/in_proj_bias packed q | k | v, self_attn.out_proj,
  self_attn_layer_norm, fc1, fc2, final_layer_norm) and decoder.lm_head.* (dense, layer_norm, weight tied to
  embed_tokens, bias); `args` is the argparse.Namespace fairseq 0.9 (MPNet's fork) builds the model and task
  from (arch mpnet_rel_base: RoBERTa base layers with use_relative_positions); `optimizer_history`,
  `extra_state` and `last_optimizer_state` are what fairseq's checkpoint upgrade and `--restore-file ...
  --reset-optimizer` read. The original code fixes what our config may vary: GELU, LayerNorm eps 1e-5, 32
  relative buckets saturating at distance 128; anything else is refused rather than written wrong.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..errors import UserError
from .fairseq import (fairseq_state_to_ours, load_fairseq_checkpoint, read_fairseq_dictionary,
                      reference_fairseq_logits, special_row_ids, task_mask_id)
from .output import check_conversion_output, conversion_output

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
DICT_FILE = "dict.txt"
ENCODER, LM_HEAD = "decoder.sentence_encoder.", "decoder.lm_head."
LAYER_PAIRS = {"attention.attn.o": "self_attn.out_proj", "attention.LayerNorm": "self_attn_layer_norm",
               "intermediate.dense": "fc1", "output.dense": "fc2", "output.LayerNorm": "final_layer_norm"}


def fairseq_dictionary_rows(tokenizer, num_rows: int) -> tuple[list[str], list[int | None]]:
    """(dict.txt symbols, our row for each fairseq row; None: a special the tokenizer lacks, written as zeros)."""
    specials, mask = special_row_ids(tokenizer), task_mask_id(tokenizer)
    if mask is None:
        raise UserError("the tokenizer has no mask token; MPNet's masked_permutation_lm task needs one")
    tokens = {i: t for t, i in tokenizer.get_vocab().items()}
    used = {i for i in specials if i is not None} | {mask}
    symbols, rows = [], list(specials)
    for our_id in range(num_rows):
        if our_id in used:
            continue
        symbol = tokens.get(our_id)
        if symbol is None:
            symbol = f"madeupword{sum(s.startswith('madeupword') for s in symbols):04d}"
        elif "\n" in symbol or "\r" in symbol or symbol == "<mask>":
            raise UserError(f"token {our_id} ({symbol!r}) cannot be a dict.txt symbol (a line break, or the <mask> "
                            f"the task adds itself)")
        symbols.append(symbol)
        rows.append(our_id)
    return symbols, rows + [mask]


def _check_representable(config):
    fixed = {"hidden_act": (config.hidden_act, "gelu"), "layer_norm_eps": (config.layer_norm_eps, 1e-5),
             "relative_attention_num_buckets": (config.relative_attention_num_buckets, 32),
             "relative_attention_max_distance": (config.relative_attention_max_distance, 128)}
    for name, (value, original) in fixed.items():
        if value != original:
            raise UserError(f"{name}={value}: the original fairseq MPNet code fixes it to {original}, so this model "
                            f"cannot be written in its format")
    if config.sliding_window_size or config.attention_pattern:
        log.warning("the original fairseq MPNet code has no sliding window or attention pattern; the checkpoint "
                    "records them in args, but fairseq will attend over whole sequences")


def ours_to_fairseq_state(state: dict, config, rows: list[int | None]) -> dict:
    """Our state dict (our key names) -> the original fairseq state dict, rows in fairseq order."""
    present = torch.tensor([r is not None for r in rows])
    index = torch.tensor([0 if r is None else r for r in rows])
    embed = torch.where(present[:, None], state["mpnet.embeddings.word_embeddings.weight"][index], 0.0)
    out = {
        f"{ENCODER}embed_tokens.weight": embed,
        f"{ENCODER}embed_positions.weight": state["mpnet.embeddings.position_embeddings.weight"],
        f"{ENCODER}emb_layer_norm.weight": state["mpnet.embeddings.LayerNorm.weight"],
        f"{ENCODER}emb_layer_norm.bias": state["mpnet.embeddings.LayerNorm.bias"],
        f"{ENCODER}relative_attention_bias.weight": state["mpnet.encoder.relative_attention_bias.weight"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"mpnet.encoder.layer.{i}.", f"{ENCODER}layers.{i}."
        for leaf, packed in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[f"{dst}self_attn.{packed}"] = torch.cat([state[f"{src}attention.attn.{n}.{leaf}"] for n in "qkv"])
        for mine, theirs in LAYER_PAIRS.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{theirs}.{leaf}"] = state[f"{src}{mine}.{leaf}"]
    if "lm_head.dense.weight" in state:
        for part in ("dense", "layer_norm"):
            for leaf in ("weight", "bias"):
                out[f"{LM_HEAD}{part}.{leaf}"] = state[f"lm_head.{part}.{leaf}"]
        out[f"{LM_HEAD}weight"] = embed  # tied, as RobertaLMHead(weight=embed_tokens.weight)
        bias = state["lm_head.bias"]
        out[f"{LM_HEAD}bias"] = torch.where(present, bias[index], bias.min() - 20.0)  # a missing special never wins
    return out


def fairseq_args(config) -> argparse.Namespace:
    """What the original code builds the model and task from (RobertaModel.add_args + the task's add_args)."""
    positions = config.max_position_embeddings - 2  # fairseq's table has padding_idx + 1 = 2 rows more
    return argparse.Namespace(
        arch="mpnet_rel_base", task="masked_permutation_lm", criterion="masked_permutation_cross_entropy",
        optimizer="adam", lr_scheduler="polynomial_decay", data=".", dataset_impl="mmap", seed=1,
        encoder_layers=config.num_hidden_layers, encoder_embed_dim=config.hidden_size,
        encoder_ffn_embed_dim=config.intermediate_size, encoder_attention_heads=config.num_attention_heads,
        activation_fn="gelu", pooler_activation_fn="tanh", dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob, activation_dropout=0.0, pooler_dropout=0.0,
        max_positions=positions, tokens_per_sample=positions, use_relative_positions=True, normalize_before=False,
        sample_break_mode="complete", pred_prob=0.15, rand_prob=0.1, keep_prob=0.1, mask_whole_words=False,
        input_mode="mpnet", max_gram=1,
        # This project's attention options (the original code ignores them; fairseq.py reads them back).
        sliding_window_size=config.sliding_window_size, attention_pattern=config.attention_pattern)


def fairseq_checkpoint(model_state: dict, args: argparse.Namespace) -> dict:
    return {
        "args": args, "model": model_state,
        "optimizer_history": [{"criterion_name": "MaskedPermutationCrossEntropyCriterion",
                               "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": None},
                               "num_updates": 0}],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}, "val_loss": None},
        "last_optimizer_state": None,
    }


def convert_to_fairseq(checkpoint, output_dir, tokenizer_dir=None, verify: bool = True,
                       overwrite: bool = False) -> dict:
    """Our checkpoint directory (or any HF MPNet directory) -> output_dir/{checkpoint.pt, dict.txt,
    conversion.json} in the original fairseq MPNet format."""
    from ..data.tokenizer import checkpoint_tokenizer, load_tokenizer
    from ..modeling import MPNetForPretraining
    from ..modeling.checkpoint import read_config, read_state_dict, to_our_keys

    check_conversion_output(output_dir, overwrite)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"{checkpoint} is not a directory; pass one of our checkpoints (an HF MPNet directory)")
    config = read_config(checkpoint)  # as trained (its attention options go into the args)
    _check_representable(config)
    # Weights, and the forward the fairseq code computes with them: dense, over whole sequences.
    model = MPNetForPretraining.from_pretrained(checkpoint, use_flex_attention=False, sliding_window_size=None,
                                                attention_pattern=None).eval()
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else checkpoint_tokenizer(checkpoint)
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} rows")
    state = model.state_dict()
    if "lm_head.dense.weight" not in to_our_keys(read_state_dict(checkpoint)):  # e.g. an MPNetModel directory
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    symbols, rows = fairseq_dictionary_rows(tokenizer, config.vocab_size)
    ckpt = fairseq_checkpoint(ours_to_fairseq_state(state, config, rows), fairseq_args(config))
    report = {"source": str(checkpoint), "fairseq_rows": len(rows), "dictionary_symbols": len(symbols),
              "identity": rows == list(range(len(rows))), "lm_head": "lm_head.dense.weight" in state,
              "padding_words": sum(s.startswith("madeupword") for s in symbols)}
    with conversion_output(output_dir, overwrite) as tmp:
        torch.save(ckpt, tmp / CHECKPOINT_FILE)
        (tmp / DICT_FILE).write_text("".join(f"{s} 0\n" for s in symbols), encoding="utf-8")
        if verify:
            report.update(_verify(tmp, model, tokenizer, rows, state))
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s/%s + %s (%d fairseq rows, %s)%s", output_dir, CHECKPOINT_FILE, DICT_FILE, len(rows),
             "fairseq id == our id" if report["identity"] else "rows reordered",
             f"; reads back {report['round_trip']}, max |diff| vs the fairseq forward "
             f"{report['max_abs_diff_vs_fairseq_forward']:.1e}" if "max_abs_diff_vs_fairseq_forward" in report else "")
    return report


def _reads_back(key: str, ours: torch.Tensor, back: dict, padding: int) -> bool:
    if key == "lm_head.decoder.weight":  # HF ties it to the embeddings; the reader does not list it
        return True
    if key not in back:
        return False
    if padding and key in ("mpnet.embeddings.word_embeddings.weight", "lm_head.bias"):
        ours = ours[: len(ours) - padding]  # rows past the tokenizer have no token to come back as
    return torch.equal(back[key], ours)


@torch.no_grad()
def _verify(directory: Path, model, tokenizer, rows, state) -> dict:
    """Read the written files back as fairseq.py does (bit-exact weights) and, with an LM head, compare the
    plain-torch fairseq forward of checkpoint.pt with our model's logits."""
    written = load_fairseq_checkpoint(directory / CHECKPOINT_FILE)
    symbols = read_fairseq_dictionary(directory / DICT_FILE)
    _, back, _ = fairseq_state_to_ours(written, tokenizer, (symbols, directory / DICT_FILE))
    padding = sum(s.startswith("madeupword") for s in symbols)
    differing = [k for k, v in state.items() if not _reads_back(k, v, back, padding)]
    if differing:
        raise UserError(f"verification failed: {differing[0]} does not read back unchanged from {CHECKPOINT_FILE}")
    result = {"round_trip": "bit-exact" if not padding else f"bit-exact but for the {padding} padding rows"}
    if "lm_head.dense.weight" in state:
        usable = [f for f, r in enumerate(rows) if r is not None and f >= 4]
        gen = torch.Generator().manual_seed(0)
        length = min(24, model.config.max_sequence_length)
        fairseq_ids = torch.tensor(usable)[torch.randint(len(usable), (2, length), generator=gen)]
        reference = reference_fairseq_logits(written, fairseq_ids)
        ours = model.mlm_logits(torch.tensor([0 if r is None else r for r in rows])[fairseq_ids])
        present = [f for f, r in enumerate(rows) if r is not None]
        diff = (ours[..., [rows[f] for f in present]] - reference[..., present]).abs().max().item()
        if not diff <= 1e-4 * max(1.0, reference.abs().max().item()):
            raise UserError(f"verification failed: the fairseq forward of {CHECKPOINT_FILE} differs from the model "
                            f"by {diff:.3g}")
        result["max_abs_diff_vs_fairseq_forward"] = diff
    return result
