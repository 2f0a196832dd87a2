"""Import an ORIGINAL fairseq MPNet checkpoint (microsoft/MPNet, pretraining/fairseq) without fairseq.

The checkpoint format (verified against microsoft/MPNet: models/masked_permutation_net.py,
models/roberta/model.py, modules/transformer_sentence_encoder{,_layer}.py,
modules/rel_multihead_attention.py):

- `ckpt["model"]`: the state dict. The encoder lives under `decoder.sentence_encoder.` (fairseq <= 0.9
  calls RoBERTa's encoder `decoder`; later versions `encoder.`; annotated-mpnet has no prefix and
  stores the weights under `ckpt["model_states"]`):
    embed_tokens.weight (V x H), embed_positions.weight (max_positions + 2 x H, padding_idx 1),
    emb_layer_norm.{weight,bias} (applied to the embeddings: RobertaEncoder passes
    encoder_normalize_before=True with normalize_before=False, i.e. post-LN),
    relative_attention_bias.weight (32 buckets x heads; only with use_relative_positions / mpnet_rel_base),
    layers.{i}.self_attn.in_proj_weight (3H x H, rows q | k | v), .in_proj_bias (3H),
    layers.{i}.self_attn.out_proj.{weight,bias}, layers.{i}.self_attn_layer_norm.{weight,bias},
    layers.{i}.fc1.{weight,bias}, layers.{i}.fc2.{weight,bias}, layers.{i}.final_layer_norm.{weight,bias};
  and the LM head under `decoder.lm_head.`: dense.{weight,bias}, layer_norm.{weight,bias}, weight
  (tied to embed_tokens) and bias (V).
- `ckpt["args"]`: an argparse.Namespace (encoder_layers, encoder_embed_dim, encoder_ffn_embed_dim,
  encoder_attention_heads, activation_fn, dropout, attention_dropout, normalize_before, ...);
  newer fairseq stores `ckpt["cfg"]["model"]` instead. Shapes in the state dict are the ground truth;
  the args only fill in what shapes cannot tell (activation, dropout, pre/post-LN).

Vocabulary (what we found, see docs/finetune.md): a fairseq Dictionary numbers <s>=0, <pad>=1, </s>=2,
<unk>=3, then the lines of dict.txt in order ("symbol count"), then what the task adds: MPNet's
masked_permutation_lm task calls dictionary.add_symbol('<mask>') after loading dict.txt. MPNet's
encode.py writes BERT WordPiece strings (BertTokenizer._tokenize), so dict.txt's symbols are WordPiece
tokens; the released conversion to HF (Kaitao Song's script, ported in annotated-mpnet) copies
embed_tokens without any permutation, and HF's MPNet vocab.txt is [<s>, <pad>, </s>, <unk>] + the
30,522 BERT tokens in BERT order + [<mask>]. Hence the released dict.txt lists the BERT vocabulary in
BERT id order and fairseq id = BERT id + 4 = HF id, with <mask> = 4 + 30522 = 30526 and [UNK] = 100 + 4
= 104. We do not rely on that: every fairseq row is moved to the HF id of its symbol, so a dict.txt in
any order (e.g. frequency-sorted, as fairseq-preprocess writes without --srcdict) converts correctly.
A dict.txt whose symbols are all integers is read as BERT token ids (RoBERTa-style dictionaries list
GPT-2 BPE ids that way): symbol k is BERT token k, i.e. HF id k + 4. The conversion reports whether
the mapping was the identity. fairseq's rows 0-3 go to our tokens of the same spelling, else to the
tokenizer's token of that role (a BERT-style tokenizer's [CLS] [PAD] [SEP] [UNK]), and the row the task
appends to its mask token; to_fairseq.py writes by the same rules, so the two are exact inverses.
"""
from __future__ import annotations

import argparse
import logging
import math
import pickle
from pathlib import Path

import torch

from ..data.fairseq_data import FAIRSEQ_SPECIALS, SPECIAL_ROLES, read_fairseq_dictionary
from ..errors import UserError

log = logging.getLogger(__name__)

ENCODER_PREFIXES = ("decoder.sentence_encoder.", "encoder.sentence_encoder.", "sentence_encoder.")


# ------------------------------------------------------------------------------- loading safely


class _Stub:
    """Stands in for any class the restricted unpickler does not allow (fairseq meters, omegaconf
    configs, ...): it records its constructor arguments and state instead of running foreign code."""

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        self._state = state

    def __call__(self, *args, **kwargs):
        return _Stub(*args, **kwargs)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what a checkpoint's tensors and args need; everything else becomes a _Stub."""

    _ALLOWED_MODULE_PREFIXES = ("torch._utils", "torch.storage", "torch.serialization", "torch._tensor")
    _ALLOWED = {("collections", "OrderedDict"), ("collections", "defaultdict"), ("argparse", "Namespace"),
                ("torch", "Size"), ("torch", "device"), ("torch", "dtype"), ("builtins", "set"),
                ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"), ("builtins", "range"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray")}

    def find_class(self, module, name):
        storage = module == "torch" and (name.endswith("Storage") or name in ("float32", "float16", "bfloat16"))
        if (module, name) in self._ALLOWED or storage or module.startswith(self._ALLOWED_MODULE_PREFIXES):
            return super().find_class(module, name)
        if module.startswith("torch") and name.startswith("_rebuild"):
            return super().find_class(module, name)
        return type(name, (_Stub,), {"__module__": f"stub.{module}"})


class _RestrictedPickleModule:
    """What torch.load needs from a pickle module, with the restricted Unpickler."""

    Unpickler = _RestrictedUnpickler
    __name__ = "mpnet_restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def load_fairseq_checkpoint(path) -> dict:
    """torch.load without executing foreign code: weights_only (plus argparse.Namespace) first; if the
    file holds other objects (fairseq meters, omegaconf cfg), a restricted unpickler that turns unknown
    classes into inert stubs."""
    import argparse as _argparse

    path = Path(path)
    if not path.is_file():
        raise UserError(f"fairseq checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([_argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        log.info("%s holds more than tensors and args (%s); reading it with a restricted unpickler",
                 path, str(err).splitlines()[0][:120])
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"cannot read {path} as a PyTorch checkpoint ({str(err).splitlines()[0]}); "
                        "the file is truncated or not a fairseq checkpoint") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, AttributeError, TypeError) as err:
        raise UserError(f"cannot read {path} as a PyTorch checkpoint ({str(err).splitlines()[0]}); "
                        "the file is truncated or not a fairseq checkpoint") from None


# ------------------------------------------------------------------------------------ dictionary


def special_row_ids(tokenizer) -> list[int | None]:
    """Our ids of fairseq's rows 0-3 (<s> <pad> </s> <unk>) in a checkpoint: the token of that spelling when the
    tokenizer has one (the released MPNet conversion copies row 3 to HF's '<unk>', id 3, not to [UNK]), else the
    token with that role ([CLS] as <s> for a BERT-style tokenizer), else none."""
    vocab = tokenizer.get_vocab()
    return [vocab[symbol] if symbol in vocab else getattr(tokenizer, role, None)
            for symbol, role in zip(FAIRSEQ_SPECIALS, SPECIAL_ROLES)]


def task_mask_id(tokenizer) -> int | None:
    """Our id of the row masked_permutation_lm appends after dict.txt (dictionary.add_symbol('<mask>'))."""
    return tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.get_vocab().get("<mask>")


def vocabulary_mapping(symbols: list[str], num_rows: int, tokenizer) -> tuple[list[int | None], dict]:
    """For each fairseq row (embedding row / output logit), the HF id of its symbol (None: dropped).

    Rows 0-3 follow special_row_ids; rows beyond dict.txt are what the task added: first <mask> (task_mask_id),
    then fairseq's padding words (madeupword0000...), which have no HF counterpart.
    """
    if num_rows < len(symbols):
        raise UserError(f"the dictionary has {len(symbols)} symbols (with the 4 specials) but the checkpoint's "
                        f"embedding has only {num_rows} rows; this dict.txt does not belong to this checkpoint")
    mask_row = len(symbols)
    extra = ["<mask>"] + [f"madeupword{i:04d}" for i in range(num_rows - len(symbols) - 1)]
    symbols = symbols + extra[: num_rows - len(symbols)]
    vocab = tokenizer.get_vocab()
    dict_symbols = [s for s in symbols[4:mask_row] if not s.startswith("madeupword")]
    integer_symbols = bool(dict_symbols) and all(s.isdigit() for s in dict_symbols)
    hf_tokens = {i: t for t, i in vocab.items()}
    bert_offset = len(FAIRSEQ_SPECIALS) if tuple(hf_tokens.get(i) for i in range(4)) == FAIRSEQ_SPECIALS else 0
    mapping: list[int | None] = special_row_ids(tokenizer)
    for row, symbol in enumerate(symbols[4:], start=4):
        if row == mask_row:
            mapping.append(task_mask_id(tokenizer))
        elif integer_symbols and symbol.isdigit():
            hf_id = int(symbol) + bert_offset  # BERT id k -> HF MPNet id k + 4
            mapping.append(hf_id if hf_id in hf_tokens else None)
        else:
            mapping.append(vocab.get(symbol))
    mapped = [h for h in mapping if h is not None]
    dropped = [symbols[f] for f, h in enumerate(mapping) if h is None]
    _check_dictionary_share(sum(mapping[row] is not None for row in range(4, mask_row)
                                if not symbols[row].startswith("madeupword")), len(dict_symbols), dropped)
    if dropped:
        log.info("%d fairseq rows have no HF counterpart and are dropped (e.g. %s)", len(dropped), ", ".join(dropped[:5]))
    report = {
        "dictionary_symbols": "bert-ids" if integer_symbols else "tokens",
        "fairseq_rows": num_rows,
        "hf_vocab_size": len(vocab),
        "rows_dropped": len(dropped),
        "rows_dropped_examples": dropped[:10],
        "hf_ids_without_fairseq_row": len(vocab) - len(set(mapped)),
        "identity": mapping == list(range(num_rows)) and num_rows == len(vocab),
    }
    return mapping, report


# A dict.txt that belongs to the checkpoint and the tokenizer maps all of its symbols (fairseq-preprocess writes
# the tokenizer's own pieces); one that maps fewer belongs to another model, and converting it would keep only
# the rows it happens to share (a wrong BERT dict.txt kept 4 of 30,527) while the check still agreed on them.
MIN_DICTIONARY_SHARE = 0.99


def _check_dictionary_share(mapped: int, total: int, dropped: list[str]):
    if total and mapped < MIN_DICTIONARY_SHARE * total:
        raise UserError(f"the dictionary maps only {mapped:,} of its {total:,} symbols ({100 * mapped / total:.1f}%, "
                        f"at least {100 * MIN_DICTIONARY_SHARE:.0f}% needed) to the tokenizer's vocabulary, e.g. "
                        f"{', '.join(map(repr, dropped[:3]))}: this dict.txt or --tokenizer does not belong to this "
                        f"checkpoint")


def _remap_rows(weight: torch.Tensor, mapping: list[int | None], hf_size: int, fill_row: torch.Tensor) -> torch.Tensor:
    """new[hf_id] = old[fairseq_id]; HF ids the fairseq model never had get `fill_row` (its <unk>)."""
    out = fill_row.expand(hf_size, *weight.shape[1:]).clone()
    for fairseq_id, hf_id in enumerate(mapping):  # later rows win, like fairseq's indices for overwritten symbols
        if hf_id is not None:
            out[hf_id] = weight[fairseq_id]
    return out


# -------------------------------------------------------------------------------------- weights


def _args_dict(ckpt: dict) -> dict:
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return args
    cfg = ckpt.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), (dict, argparse.Namespace)):
        model = cfg["model"]
        return vars(model) if isinstance(model, argparse.Namespace) else dict(model)
    return {}


def _or(value, default):
    return default if value is None else value


def _find_prefix(state: dict) -> str:
    for prefix in ENCODER_PREFIXES:
        if f"{prefix}embed_tokens.weight" in state:
            return prefix
    keys = ", ".join(sorted(state)[:5])
    raise UserError(f"the checkpoint has no MPNet encoder (no '*sentence_encoder.embed_tokens.weight'; first keys: "
                    f"{keys}); is it a fairseq MPNet/RoBERTa checkpoint?")


PLUGIN_PREFIX = "model."  # mpnet.fairseq_plugin's model holds our MPNetForPretraining as `model`
WORD_EMBEDDINGS = "mpnet.embeddings.word_embeddings.weight"


def plugin_state_to_ours(state: dict, args: dict, tokenizer, mapping_info: tuple):
    """A checkpoint that fairseq-train wrote with mpnet.fairseq_plugin: our parameter names under `model.`, rows
    in the fairseq dictionary's order (dict.txt + the task's <mask>), moved to our tokenizer's ids."""
    from ..modeling import MPNetConfig

    ours = {k[len(PLUGIN_PREFIX):]: v.float() for k, v in state.items()
            if k.startswith(PLUGIN_PREFIX) and k != PLUGIN_PREFIX + "lm_head.decoder.weight"}  # tied
    embed = ours[WORD_EMBEDDINGS]
    symbols, dict_path = mapping_info
    mapping, report = vocabulary_mapping(symbols, embed.shape[0], tokenizer)
    hf_size = len(tokenizer.get_vocab())
    ours[WORD_EMBEDDINGS] = _remap_rows(embed, mapping, hf_size, embed[FAIRSEQ_SPECIALS.index("<unk>")])
    if "lm_head.bias" in ours:
        bias = ours["lm_head.bias"]
        ours["lm_head.bias"] = _remap_rows(bias, mapping, hf_size, bias.min() - 20.0)
    else:
        report["lm_head"] = "new"
    layers = 1 + max(int(k.split(".")[3]) for k in ours if k.startswith("mpnet.encoder.layer."))
    rel = ours["mpnet.encoder.relative_attention_bias.weight"]
    config = MPNetConfig(
        vocab_size=hf_size, hidden_size=embed.shape[1], num_hidden_layers=layers, num_attention_heads=rel.shape[1],
        intermediate_size=ours["mpnet.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=ours["mpnet.embeddings.position_embeddings.weight"].shape[0],
        hidden_dropout_prob=float(args.get("dropout", 0.1)),
        attention_probs_dropout_prob=float(args.get("attention_dropout", 0.1)),
        relative_attention_num_buckets=rel.shape[0], pad_token_id=_or(tokenizer.pad_token_id, 1),
        bos_token_id=_or(tokenizer.bos_token_id, 0), eos_token_id=_or(tokenizer.eos_token_id, 2),
        mask_token_id=task_mask_id(tokenizer), sliding_window_size=args.get("sliding_window_size"))
    report.update(hidden_size=config.hidden_size, layers=layers, heads=config.num_attention_heads,
                  ffn=config.intermediate_size, dictionary=str(dict_path), mapping=mapping, source="fairseq plugin")
    return config, ours, report


def fairseq_state_to_ours(ckpt: dict, tokenizer, mapping_info: tuple | None = None):
    """(our MPNetConfig, our state dict, report) from a loaded fairseq checkpoint."""
    from ..modeling import MPNetConfig

    state = ckpt.get("model", ckpt.get("model_states"))
    if not isinstance(state, dict):
        raise UserError("the checkpoint has no 'model' state dict; it is not a fairseq training checkpoint")
    args = _args_dict(ckpt)
    if PLUGIN_PREFIX + WORD_EMBEDDINGS in state:
        return plugin_state_to_ours(state, args, tokenizer, mapping_info)
    enc = _find_prefix(state)
    head = enc.replace("sentence_encoder.", "lm_head.")

    def get(key):
        if key not in state:
            raise UserError(f"the checkpoint lacks {key}; it is not a complete fairseq MPNet checkpoint")
        return state[key].float()

    if args.get("normalize_before"):
        raise UserError("this checkpoint was trained with --normalize-before (pre-LayerNorm layers); MPNet/HF "
                        "layers are post-LayerNorm, so it cannot be converted faithfully")
    activation = args.get("activation_fn", "gelu")
    if activation != "gelu":
        raise UserError(f"activation_fn is {activation!r}; our MPNet (like HF's) uses exact GELU ('gelu') only")
    if f"{enc}emb_layer_norm.weight" not in state:
        raise UserError("the checkpoint has no emb_layer_norm; MPNet always normalises the embeddings")
    if any(k.startswith(f"{enc}segment_embeddings") for k in state):
        raise UserError("the checkpoint has segment embeddings, which MPNet does not use")

    embed = get(f"{enc}embed_tokens.weight")
    hidden = embed.shape[1]
    layers = 1 + max(int(k[len(f"{enc}layers."):].split(".")[0]) for k in state if k.startswith(f"{enc}layers."))
    ffn = get(f"{enc}layers.0.fc1.weight").shape[0]
    rel_key = f"{enc}relative_attention_bias.weight"
    heads = state[rel_key].shape[1] if rel_key in state else args.get("encoder_attention_heads")
    if heads is None:
        raise UserError("cannot tell the number of attention heads: no relative_attention_bias and no args")
    if args.get("encoder_attention_heads") not in (None, heads):
        raise UserError(f"args say {args['encoder_attention_heads']} heads but relative_attention_bias has {heads}")
    for name, expected in (("encoder_embed_dim", hidden), ("encoder_layers", layers), ("encoder_ffn_embed_dim", ffn)):
        if args.get(name) not in (None, expected):
            raise UserError(f"args say {name}={args[name]} but the weights imply {expected}; the checkpoint is inconsistent")

    num_rows = embed.shape[0]
    symbols, dict_path = mapping_info
    mapping, report = vocabulary_mapping(symbols, num_rows, tokenizer)
    hf_size = len(tokenizer.get_vocab())
    unk_row = embed[FAIRSEQ_SPECIALS.index("<unk>")]

    rel_buckets = state[rel_key].shape[0] if rel_key in state else 32
    config = MPNetConfig(
        vocab_size=hf_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=int(heads),
        intermediate_size=ffn, max_position_embeddings=get(f"{enc}embed_positions.weight").shape[0],
        hidden_dropout_prob=float(args.get("dropout", 0.1)),
        attention_probs_dropout_prob=float(args.get("attention_dropout", 0.1)),
        layer_norm_eps=1e-5,  # fairseq's LayerNorm default (HF's MPNetConfig default 1e-12 would be wrong)
        relative_attention_num_buckets=rel_buckets, relative_attention_max_distance=128,
        pad_token_id=_or(tokenizer.pad_token_id, 1), bos_token_id=_or(tokenizer.bos_token_id, 0),
        eos_token_id=_or(tokenizer.eos_token_id, 2),
        mask_token_id=tokenizer.mask_token_id if tokenizer.mask_token_id is not None else hf_size - 1,
        # This project's attention options, when the checkpoint was written by to_fairseq.py (or the plugin).
        sliding_window_size=args.get("sliding_window_size"), attention_pattern=args.get("attention_pattern"),
    )
    ours = {
        "mpnet.embeddings.word_embeddings.weight": _remap_rows(embed, mapping, hf_size, unk_row),
        "mpnet.embeddings.position_embeddings.weight": get(f"{enc}embed_positions.weight"),
        "mpnet.embeddings.LayerNorm.weight": get(f"{enc}emb_layer_norm.weight"),
        "mpnet.embeddings.LayerNorm.bias": get(f"{enc}emb_layer_norm.bias"),
    }
    if rel_key in state:
        ours["mpnet.encoder.relative_attention_bias.weight"] = get(rel_key)
    else:
        # mpnet_base (without _rel_) has no relative bias: a zero table adds nothing, which is exact.
        log.info("the checkpoint has no relative_attention_bias (arch without relative positions); using zeros")
        ours["mpnet.encoder.relative_attention_bias.weight"] = torch.zeros(rel_buckets, int(heads))
    for i in range(layers):
        src, dst = f"{enc}layers.{i}.", f"mpnet.encoder.layer.{i}."
        in_w, in_b = get(f"{src}self_attn.in_proj_weight"), get(f"{src}self_attn.in_proj_bias")
        for part, name in enumerate("qkv"):  # packed rows: q | k | v (fairseq's in_proj_q/k/v slices)
            ours[f"{dst}attention.attn.{name}.weight"] = in_w[part * hidden:(part + 1) * hidden]
            ours[f"{dst}attention.attn.{name}.bias"] = in_b[part * hidden:(part + 1) * hidden]
        pairs = {"self_attn.out_proj": "attention.attn.o", "self_attn_layer_norm": "attention.LayerNorm",
                 "fc1": "intermediate.dense", "fc2": "output.dense", "final_layer_norm": "output.LayerNorm"}
        for theirs, mine in pairs.items():
            for leaf in ("weight", "bias"):
                ours[f"{dst}{mine}.{leaf}"] = get(f"{src}{theirs}.{leaf}")
    if f"{head}dense.weight" in state:
        for theirs, mine in (("dense", "dense"), ("layer_norm", "layer_norm")):
            for leaf in ("weight", "bias"):
                ours[f"lm_head.{mine}.{leaf}"] = get(f"{head}{theirs}.{leaf}")
        bias = get(f"{head}bias")
        # Rows the fairseq model never had must never win a prediction: give them a very low bias.
        ours["lm_head.bias"] = _remap_rows(bias, mapping, hf_size, bias.min() - 20.0)
        if f"{head}weight" in state and not torch.equal(get(f"{head}weight"), embed):
            log.warning("the LM head's output weight is not tied to embed_tokens in this checkpoint; HF MPNet "
                        "ties them, so the converted LM head uses the token embeddings")
            report["lm_head_untied"] = True
    else:
        log.info("the checkpoint has no LM head (a fine-tuned encoder?); the converted model gets a new one")
        report["lm_head"] = "new"
    ignored = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in state
                      if not k.startswith((enc, head)) and "." in k})
    if ignored:
        log.info("not converted (no MPNet counterpart): %s", ", ".join(ignored))
    report.update(hidden_size=hidden, layers=layers, heads=int(heads), ffn=ffn, dictionary=str(dict_path),
                  mapping=mapping)
    return config, ours, report


def reference_fairseq_logits(ckpt: dict, fairseq_ids: torch.Tensor) -> torch.Tensor:
    """The fairseq single-stream forward (MPNet's TransformerSentenceEncoder + RobertaLMHead) on the
    original weights, in plain torch ops: used to verify a conversion (no padding, eval mode)."""
    state = {k: v.float() for k, v in ckpt.get("model", ckpt.get("model_states")).items() if torch.is_tensor(v)}
    if PLUGIN_PREFIX + WORD_EMBEDDINGS in state:
        return _plugin_logits(state, fairseq_ids)
    enc = _find_prefix(state)
    head = enc.replace("sentence_encoder.", "lm_head.")
    hidden = state[f"{enc}embed_tokens.weight"].shape[1]
    rel = state.get(f"{enc}relative_attention_bias.weight")
    heads = rel.shape[1] if rel is not None else _args_dict(ckpt)["encoder_attention_heads"]
    batch, length = fairseq_ids.shape
    ln = lambda x, p: torch.nn.functional.layer_norm(x, (hidden,), state[p + ".weight"], state[p + ".bias"], 1e-5)  # noqa: E731
    x = state[f"{enc}embed_tokens.weight"][fairseq_ids] + state[f"{enc}embed_positions.weight"][torch.arange(length) + 2]
    x = ln(x, f"{enc}emb_layer_norm")
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    n = -relative
    bucket = (n < 0).long() * 16
    n = n.abs()
    large = 8 + (torch.log(n.float().clamp(min=1) / 8) / math.log(128 / 8) * 8).long()
    bucket = bucket + torch.where(n < 8, n, large.clamp(max=15))
    bias = rel[bucket].permute(2, 0, 1) if rel is not None else torch.zeros(heads, length, length)
    head_dim = hidden // heads
    layers = 1 + max(int(k[len(f"{enc}layers."):].split(".")[0]) for k in state if k.startswith(f"{enc}layers."))
    for i in range(layers):
        p = f"{enc}layers.{i}."
        qkv = torch.nn.functional.linear(x, state[p + "self_attn.in_proj_weight"], state[p + "self_attn.in_proj_bias"])
        q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        scores = (q * head_dim**-0.5) @ k.transpose(-1, -2) + bias
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = ln(x + torch.nn.functional.linear(attn, state[p + "self_attn.out_proj.weight"],
                                              state[p + "self_attn.out_proj.bias"]), p + "self_attn_layer_norm")
        ffn = torch.nn.functional.gelu(torch.nn.functional.linear(x, state[p + "fc1.weight"], state[p + "fc1.bias"]))
        x = ln(x + torch.nn.functional.linear(ffn, state[p + "fc2.weight"], state[p + "fc2.bias"]), p + "final_layer_norm")
    y = ln(torch.nn.functional.gelu(torch.nn.functional.linear(x, state[head + "dense.weight"], state[head + "dense.bias"])),
           head + "layer_norm")
    return torch.nn.functional.linear(y, state[f"{enc}embed_tokens.weight"]) + state[head + "bias"]


@torch.no_grad()
def _plugin_logits(state: dict, fairseq_ids: torch.Tensor) -> torch.Tensor:
    """A plugin checkpoint's forward as fairseq-train ran it: our model, in the fairseq dictionary's id space."""
    from ..modeling import MPNetConfig, MPNetForPretraining

    ours = {k[len(PLUGIN_PREFIX):]: v for k, v in state.items() if k.startswith(PLUGIN_PREFIX)}
    rel = ours["mpnet.encoder.relative_attention_bias.weight"]
    embed = ours[WORD_EMBEDDINGS]
    config = MPNetConfig(
        vocab_size=embed.shape[0], hidden_size=embed.shape[1], num_attention_heads=rel.shape[1],
        num_hidden_layers=1 + max(int(k.split(".")[3]) for k in ours if k.startswith("mpnet.encoder.layer.")),
        intermediate_size=ours["mpnet.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=ours["mpnet.embeddings.position_embeddings.weight"].shape[0],
        relative_attention_num_buckets=rel.shape[0], mask_token_id=embed.shape[0] - 1)
    model = MPNetForPretraining(config).eval()
    model.load_state_dict(ours)
    return model.mlm_logits(fairseq_ids)


def _load_tokenizer(tokenizer_dir):
    from ..data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir if tokenizer_dir else "default")


def convert_fairseq(checkpoint, dict_path, output_dir, tokenizer_dir=None, verify: bool = True,
                    overwrite: bool = False) -> dict:
    """fairseq MPNet checkpoint + dict.txt -> our checkpoint directory (HF MPNetForMaskedLM layout)."""
    import json

    from ..modeling import MPNetForPretraining
    from .output import check_conversion_output, conversion_output

    check_conversion_output(output_dir, overwrite)
    tokenizer = _load_tokenizer(tokenizer_dir)
    symbols = read_fairseq_dictionary(dict_path)
    ckpt = load_fairseq_checkpoint(checkpoint)
    config, state, report = fairseq_state_to_ours(ckpt, tokenizer, (symbols, dict_path))
    model = MPNetForPretraining(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.decoder.weight"]  # tied to the embeddings
    if unexpected or (missing and report.get("lm_head") != "new"):
        raise UserError(f"conversion produced mismatched keys (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    mapping = report.pop("mapping")
    with conversion_output(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp, tokenizer=tokenizer)
        if verify and report.get("lm_head") != "new":
            report["max_abs_diff_vs_fairseq_forward"] = _verify(ckpt, tmp, mapping)
        (tmp / "conversion.json").write_text(json.dumps({"source": str(checkpoint), **report}, indent=2) + "\n")
    log.info("converted %s (%d layers, hidden %d, %d heads) to %s; vocabulary mapping %s%s", checkpoint,
             report["layers"], report["hidden_size"], report["heads"], output_dir,
             "is the identity" if report["identity"] else "reorders rows",
             f"; max |diff| vs the fairseq forward {report['max_abs_diff_vs_fairseq_forward']:.2e}"
             if "max_abs_diff_vs_fairseq_forward" in report else "")
    return report


@torch.no_grad()
def _verify(ckpt, output_dir, mapping) -> float:
    """Reload the written directory and compare its MLM logits with the fairseq forward on the same
    tokens (fairseq ids for fairseq, mapped HF ids for ours)."""
    from ..modeling import MPNetForPretraining

    # The fairseq forward attends over whole sequences, whatever attention options the args carried.
    model = MPNetForPretraining.from_pretrained(output_dir, sliding_window_size=None, attention_pattern=None).eval()
    # Token ids drawn from the converted vocabulary (every HF id that has a fairseq row), so the check reads
    # the rows a user's text will read, not only the rows the dictionary happens to share.
    row_of = {h: f for f, h in enumerate(mapping) if h is not None and f >= 4}
    usable = sorted(row_of)
    gen = torch.Generator().manual_seed(0)
    length = min(24, model.config.max_sequence_length)
    hf_ids = torch.tensor(usable)[torch.randint(len(usable), (2, length), generator=gen)]
    fairseq_ids = torch.tensor([[row_of[h] for h in row] for row in hf_ids.tolist()])
    fairseq_ids[:, 0], hf_ids[:, 0] = 0, mapping[0]  # <s>
    reference = reference_fairseq_logits(ckpt, fairseq_ids)
    ours = model.mlm_logits(hf_ids)
    rows = torch.tensor([f for f, h in enumerate(mapping) if h is not None])
    cols = torch.tensor([mapping[f] for f in rows.tolist()])
    diff = (ours[..., cols] - reference[..., rows]).abs().max().item()
    if not diff <= 1e-3 * max(1.0, reference.abs().max().item()):
        raise UserError(f"verification failed: the converted model differs from the fairseq forward by {diff:.3g}")
    return diff
