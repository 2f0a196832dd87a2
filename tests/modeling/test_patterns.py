"""Attention patterns (mpnet/modeling/patterns.py): definitions, both backends, composition, wiring.

- Masks, brute force: every pattern's definition written out in pure Python per (query, key) pair
  of ORIGINAL positions (`pattern_allows` below, independent of the library), AND the two-stream rules
  and padding (`helpers.rule_mask`), against the dense backend's materialised mask and against the
  BlockMasks' mask_mods and block tables; two-stream (permuted, padded) and single-stream layouts,
  with and without document ids.
- Forward parity: dense == flex (fp32, <= 1e-5) for every pattern and for compositions, two-stream
  and single-stream, with padding, at n = 70 (not a multiple of the 128 block).
- Score mods against their formulas: a 1-layer model against a hand-written dense reference.
- swin alternates per layer (even plain, odd shifted) with at most two states per forward.
- The registry parses specs, rejects bad ones with one sentence naming the valid ones; config and CLI.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from helpers import (
    encoding_batch,
    generator,
    make_model,
    max_abs,
    pretraining_batch,
    rule_mask,
    stacked_positions,
    with_backend,
)
from test_masks import _check_block_mask
from mpnet import MPNetConfig
from mpnet.errors import UserError
from mpnet.modeling.attention import make_dense_attention_state
from mpnet.modeling.block_masks import make_two_stream_block_masks
from mpnet.modeling.masks import relative_position_bucket, within_window
from mpnet.modeling.patterns import (
    BadAttentionPattern,
    alibi_slope,
    as_pattern,
    parse_attention_pattern,
    within_radius,
)

TOL = 1e-5
TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2)

# ------------------------------------------------------------------ the definitions, brute force


def _block_of_shifted(p, b):
    """Swin's shifted partition of 0, 1, 2, ...: [0, b//2) is block 0, then every b positions."""
    s = b // 2
    return 0 if p < s else 1 + (p - s) // b


def pattern_allows(spec: str, pq: int, pk: int, layer: int) -> bool:
    """The definitions of docs/patterns.md, one pair of original positions at a time."""
    for part in filter(None, spec.split(",")):
        name, *args = part.split(":")
        a = [float(x) if name == "softcap" else int(x) for x in args]
        d = pk - pq
        if name in ("window", "neighbourhood"):
            ok = abs(d) <= a[0]
        elif name == "dilated":
            ok = abs(d) <= a[0] * a[1] and d % a[1] == 0
        elif name == "global":
            globals_ = a[1:] or [0]
            ok = pq in globals_ or pk in globals_ or abs(d) <= a[0]
        elif name == "block":
            ok = pq // a[0] == pk // a[0]
        elif name == "swin":
            ok = (pq // a[0] == pk // a[0]) if layer % 2 == 0 else \
                _block_of_shifted(pq, a[0]) == _block_of_shifted(pk, a[0])
        elif name == "prefix":
            ok = pk < a[0] if pq < a[0] else (pk < a[0] or pk <= pq)
        elif name in ("softcap", "alibi"):
            ok = True  # score mods hide nothing
        else:
            raise AssertionError(name)
        if not ok:
            return False
    return True


def expected_mask(positions_row, documents_row, n, m, spec, layer):
    """(n + 2m, n + m) for one batch row: two-stream rules & padding & pattern & same document."""
    rows, kv_len = n + 2 * m, n + m
    out = rule_mask(positions_row, n, m, None, range(rows), kv_len)
    pos = [int(p) for p in positions_row]
    for q in range(rows):
        for k in range(kv_len):
            if out[q, k]:
                same_doc = documents_row is None or int(documents_row[q]) == int(documents_row[k])
                out[q, k] = same_doc and pattern_allows(spec, pos[q], pos[k], layer)
    return out


# Small enough for n = 24 to cut every pattern's shape several times.
MASK_SPECS = ["window:3", "neighbourhood:2", "dilated:3:2", "global:2:0:13", "global:3", "block:5", "swin:6",
              "prefix:7", "prefix:0", "softcap:4", "alibi", "block:8,dilated:2:2", "swin:8,global:2:0,alibi"]


def _layouts(documents: bool):
    """(name, stacked positions, stacked document ids or None, n, m) for the mask checks."""
    n, m = 24, 4
    _, positions, mask = pretraining_batch(generator(7), n, m, (0, 5))
    two_stream = stacked_positions(positions, mask, n, m)
    lengths = (24, 17)
    single = torch.stack([torch.where(torch.arange(n) < length, torch.arange(n), -1) for length in lengths])

    def docs(stacked):  # documents of 9 consecutive ORIGINAL positions; padding -1
        return torch.where(stacked >= 0, stacked // 9, -1) if documents else None

    return [("two-stream", two_stream, docs(two_stream), n, m), ("single", single, docs(single), n, 0)]


# FlexAttention's mask_mods cost a trace each on CPU; the document rule is one AND, so two specs suffice.
MASK_CASES = [(spec, False) for spec in MASK_SPECS] + [("window:3", True), ("swin:8,global:2:0,alibi", True)]


@pytest.mark.parametrize("spec,documents", MASK_CASES)
def test_masks_match_definitions_both_backends(spec, documents):
    layers = (0, 1) if as_pattern(spec).alternates else (0,)
    for name, positions, docs, n, m in _layouts(documents):
        for layer in layers:
            expected = torch.stack([expected_mask(positions[b], None if docs is None else docs[b], n, m, spec, layer)
                                    for b in range(positions.shape[0])])
            state = make_dense_attention_state(positions, n, m, torch.zeros(2, 257), 128, pattern=spec,
                                               document_ids=docs, layer=layer)
            mismatch = (state.allowed[:, 0] != expected).nonzero().tolist()
            assert not mismatch, f"{name}, layer {layer}: dense differs at (b, q, k) {mismatch[:5]}"
            content, query = make_two_stream_block_masks(positions, n, m, pattern=spec, document_ids=docs, layer=layer)
            _check_block_mask(content, expected[:, : n + m], f"{name} content, layer {layer}")
            if m:
                _check_block_mask(query, expected[:, n + m:], f"{name} query, layer {layer}")


def test_neighbourhood_is_the_window():
    """In 1-D a neighbourhood of radius r is the window |d| <= r: one function, not two."""
    assert within_radius is within_window
    positions = torch.arange(30)[None]
    a = make_dense_attention_state(positions, 30, 0, torch.zeros(2, 257), 128, pattern="neighbourhood:4").allowed
    b = make_dense_attention_state(positions, 30, 0, torch.zeros(2, 257), 128, pattern="window:4").allowed
    assert torch.equal(a, b)


def test_sliding_window_size_means_window_and_intersects_a_pattern():
    positions = torch.arange(40)[None]

    def allowed(**kw):
        return make_dense_attention_state(positions, 40, 0, torch.zeros(2, 257), 128, **kw).allowed

    config = MPNetConfig.tiny(sliding_window_size=5, attention_pattern="block:8")
    assert config.pattern.spec == "window:5,block:8"  # the config folds the window into the pattern, once
    assert torch.equal(allowed(pattern=config.pattern), allowed(pattern="window:5") & allowed(pattern="block:8"))
    assert MPNetConfig.tiny(sliding_window_size=5).pattern.spec == "window:5"


def test_block_pattern_is_block_sparse_for_real():
    """block:128 in natural order: FlexAttention computes only the diagonal 128-blocks, all full."""
    content, _ = make_two_stream_block_masks(torch.arange(512)[None], 512, 0, pattern="block:128")
    blocks = content.to_dense()[0, 0].bool()
    assert torch.equal(blocks, torch.eye(4, dtype=torch.bool))
    assert content.full_kv_num_blocks.sum() == 4 and content.kv_num_blocks.sum() == 0


# ------------------------------------------------------------------------ forward parity, n = 70

# neighbourhood is the window's own function (test_neighbourhood_is_the_window); composing masks
# without score mods is covered by the mask checks above.
PARITY_SPECS = ["window:5", "dilated:4:3", "global:4:0:33", "block:16", "swin:16", "prefix:20", "softcap:2", "alibi",
                "swin:16,global:6:0,alibi,softcap:3"]
N, M = 70, 10


@pytest.fixture(scope="module")
def base_model():
    return make_model(seed=21, **TINY)


def _pair(base, **config):
    return with_backend(base, False, **config), with_backend(base, True, **config)


@pytest.mark.parametrize("spec", PARITY_SPECS)
def test_two_stream_dense_equals_flex(base_model, spec):
    dense, flex = _pair(base_model, attention_pattern=spec)
    ids, positions, mask = pretraining_batch(generator(3), N, M, (0, 13))
    with torch.no_grad():
        a = dense(ids, positions, M, attention_mask=mask)
        b = flex(ids, positions, M, attention_mask=mask)
        plain = with_backend(base_model, False)(ids, positions, M, attention_mask=mask)
    assert torch.isfinite(a).all()
    assert max_abs(a, b) <= TOL
    assert max_abs(a, plain) > 1e-3, "the pattern changed nothing: the case does not exercise it"


@pytest.mark.parametrize("spec", PARITY_SPECS)
def test_single_stream_dense_equals_flex(base_model, spec):
    dense, flex = _pair(base_model, attention_pattern=spec)
    ids, mask = encoding_batch(generator(4), N, (N, 41))
    with torch.no_grad():
        a = dense.encode(ids, attention_mask=mask)
        b = flex.encode(ids, attention_mask=mask)
    real = mask.bool()
    assert torch.isfinite(a[real]).all()
    assert max_abs(a[real], b[real]) <= TOL


def _documents_of(positions, mask, cut):
    """Two documents per row: original positions < cut and >= cut (padding -1), permuted like positions."""
    return torch.where(mask.bool(), (positions >= cut).long(), -1)


def test_documents_dense_equals_flex(base_model):
    dense, flex = _pair(base_model, attention_pattern="swin:16,alibi")
    ids, positions, mask = pretraining_batch(generator(5), N, M, (0, 13))
    docs = _documents_of(positions, mask, 31)
    single_ids, single_mask = encoding_batch(generator(6), N, (N, 41))
    single_docs = torch.where(single_mask.bool(), (torch.arange(N) >= 25).long(), -1)
    with torch.no_grad():
        a = dense(ids, positions, M, attention_mask=mask, document_ids=docs)
        b = flex(ids, positions, M, attention_mask=mask, document_ids=docs)
        undivided = dense(ids, positions, M, attention_mask=mask)
        c = dense.encode(single_ids, single_mask, document_ids=single_docs)
        d = flex.encode(single_ids, single_mask, document_ids=single_docs)
    assert max_abs(a, b) <= TOL
    assert max_abs(a, undivided) > 1e-3
    real = single_mask.bool()
    assert max_abs(c[real], d[real]) <= TOL


def test_two_stream_query_never_sees_another_document():
    """Black box, 1 layer: a query's logits do not move when any token of the other document changes."""
    model = make_model(seed=8, **{**TINY, "num_hidden_layers": 1})
    ids, positions, mask = pretraining_batch(generator(8), 30, 6, (0,))
    docs = _documents_of(positions, mask, 14)
    other = ids.clone()
    query_docs = docs[0, 30 - 6:]
    for t in range(30):
        other[0, t] = 3 + (int(ids[0, t]) - 3 + 7) % 60
    with torch.no_grad():
        base = model(ids, positions, 6, attention_mask=mask, document_ids=docs)
        for doc in (0, 1):
            changed = torch.where(docs == doc, other, ids)  # every token of `doc` replaced
            moved = (model(changed, positions, 6, attention_mask=mask, document_ids=docs) - base).abs().amax(-1)[0]
            assert moved[query_docs != doc].max() <= 1e-6
            assert moved[query_docs == doc].min() > 1e-3


# ------------------------------------------------------------------------ score mods vs formulas


def reference_alibi_slopes(num_heads):
    """ALiBi's get_slopes, as published (Press et al., github.com/ofirpress/attention_with_linear_biases)."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + reference_alibi_slopes(2 * closest)[0::2][: num_heads - closest]


@pytest.mark.parametrize("num_heads", range(1, 17))
def test_alibi_slopes_are_the_published_ones(num_heads):
    got = alibi_slope(torch.arange(num_heads), num_heads)
    assert torch.allclose(got, torch.tensor(reference_alibi_slopes(num_heads)), rtol=1e-6, atol=0)
    for h in range(num_heads):  # on 0-d tensors too (FlexAttention's vmap)
        assert math.isclose(float(alibi_slope(torch.tensor(h), num_heads)), reference_alibi_slopes(num_heads)[h],
                            rel_tol=1e-6)


def reference_encode(model, ids, mask, score_fn):
    """One post-LN MPNet layer written out: scores = qk/sqrt(d) + relative bias -> score_fn -> padding -> softmax."""
    layer, cfg = model.mpnet.encoder.layer[0], model.config
    real = mask.bool()
    positions = torch.where(real, real.long().cumsum(1) - 1, -1)
    hidden = model.mpnet.embeddings(ids, positions)
    attn = layer.attention.attn
    batch, n, _ = hidden.shape
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def split(x):
        return x.view(batch, n, heads, head_dim).transpose(1, 2)

    q, k, v = split(attn.q(hidden)), split(attn.k(hidden)), split(attn.v(hidden))
    relative = positions[:, None, :] - positions[:, :, None]  # key - query
    table = model.mpnet.encoder.relative_attention_bias.weight
    bias = table[relative_position_bucket(relative, 32, 128)].permute(0, 3, 1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias
    scores = score_fn(scores, torch.arange(heads)[None, :, None, None], relative.abs()[:, None].float())
    scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
    context = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, n, -1)
    hidden = layer.attention.LayerNorm(attn.o(context) + hidden)
    return layer.output.LayerNorm(layer.output.dense(torch.nn.functional.gelu(layer.intermediate.dense(hidden))) + hidden)


def _alibi_formula(scores, head, distance):
    slopes = torch.tensor(reference_alibi_slopes(scores.shape[1]))
    return scores - slopes[head] * distance


SCORE_CASES = {
    "softcap:2": lambda s, h, d: 2.0 * torch.tanh(s / 2.0),
    "alibi": _alibi_formula,
    "alibi,softcap:1.5": lambda s, h, d: 1.5 * torch.tanh(_alibi_formula(s, h, d) / 1.5),
    "softcap:1.5,alibi": lambda s, h, d: _alibi_formula(1.5 * torch.tanh(s / 1.5), h, d),
}


@pytest.mark.parametrize("spec", list(SCORE_CASES))
def test_score_mods_match_their_formulas(spec):
    dense = make_model(seed=31, **{**TINY, "num_hidden_layers": 1, "num_attention_heads": 4}, attention_pattern=spec)
    flex = with_backend(dense, True)
    ids, mask = encoding_batch(generator(9), 40, (40, 23))
    real = mask.bool()
    with torch.no_grad():
        expected = reference_encode(dense, ids, mask, SCORE_CASES[spec])
        unmodified = reference_encode(dense, ids, mask, lambda s, h, d: s)
        a, b = dense.encode(ids, mask), flex.encode(ids, mask)
    assert max_abs(a[real], expected[real]) <= TOL
    assert max_abs(b[real], expected[real]) <= TOL
    assert max_abs(expected[real], unmodified[real]) > 1e-3, "the score mod has no effect in this case"


# ---------------------------------------------------------------------- swin alternates by layer


@pytest.mark.parametrize("flex", [False, True], ids=["dense", "flex"])
def test_swin_alternates_per_layer_with_two_states(flex):
    n = 20
    model = make_model(seed=5, flex=flex, **{**TINY, "num_hidden_layers": 3}, attention_pattern="swin:6")
    seen = []
    for layer in model.mpnet.encoder.layer:
        layer.attention.attn.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    ids, mask = encoding_batch(generator(2), n, (n, 15))
    with torch.no_grad():
        model.encode(ids, mask)
    assert len(seen) == 3
    assert seen[0] is seen[2] and seen[0] is not seen[1], "layers 0 and 2 share a state, layer 1 has the other"
    positions = torch.where(mask.bool(), torch.arange(n), -1)
    for index, state in enumerate(seen):
        expected = torch.stack([expected_mask(row, None, n, 0, "swin:6", index) for row in positions])
        if flex:
            got = create_mask(state.content_mask.mask_mod, 2, 1, n, n, device="cpu")[:, 0]
        else:
            got = state.allowed[:, 0]
        assert torch.equal(got, expected), f"layer {index}"
    plain, shifted = (expected_mask(positions[0], None, n, 0, "swin:6", parity) for parity in (0, 1))
    assert not torch.equal(plain, shifted)


def test_patterns_without_alternation_build_one_state():
    model = make_model(seed=5, **{**TINY, "num_hidden_layers": 3}, attention_pattern="block:4,alibi")
    seen = []
    for layer in model.mpnet.encoder.layer:
        layer.attention.attn.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    with torch.no_grad():
        model.encode(torch.full((1, 9), 5))
    assert len({id(state) for state in seen}) == 1


# --------------------------------------------------------------------------- registry, config, CLI


@pytest.mark.parametrize("spec,masks,scores,alternates", [
    ("window:128", 1, 0, False), ("dilated:64:2", 1, 0, False), ("global:128:0", 1, 0, False),
    ("global:128:0:7:9", 1, 0, False), ("neighbourhood:3", 1, 0, False), ("neighborhood:3", 1, 0, False),
    ("block:64", 1, 0, False), ("swin:64", 1, 0, True), ("prefix:32", 1, 0, False), ("softcap:30", 0, 1, False),
    ("softcap:2.5", 0, 1, False), ("alibi", 0, 1, False), ("block:64,softcap:30", 1, 1, False),
    (" swin:8 , alibi ,softcap:30", 1, 2, True), ("", 0, 0, False), (None, 0, 0, False)])
def test_registry_parses_specs(spec, masks, scores, alternates):
    pattern = parse_attention_pattern(spec)
    assert (len(pattern.masks), len(pattern.scores), pattern.alternates) == (masks, scores, alternates)
    assert pattern.layer_variants == (2 if alternates else 1)
    assert parse_attention_pattern(spec) is pattern  # cached: flex reuses its traced mods


@pytest.mark.parametrize("spec", ["windows:3", "window", "window:3:4", "window:x", "window:0", "window:-2",
                                  "dilated:4", "dilated:4:0", "global:0:0", "global:4:-1", "block:0", "swin:1",
                                  "prefix:-1", "softcap:0", "softcap:inf", "softcap:abc", "alibi:2", "window:2.5"])
def test_registry_rejects_bad_specs_naming_the_valid_ones(spec):
    with pytest.raises(BadAttentionPattern) as info:
        parse_attention_pattern(spec)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert f"'{spec}'" in message
    for usage in ("window:W", "dilated:W:D", "global:W[:P...]", "neighbourhood:R", "block:B", "swin:B",
                  "prefix:P", "softcap:C", "alibi"):
        assert usage in message


def test_config_validates_and_round_trips_the_pattern(tmp_path):
    with pytest.raises(UserError, match="valid patterns are"):
        MPNetConfig.tiny(attention_pattern="blocks:64")
    assert MPNetConfig.tiny().attention_pattern is None
    assert MPNetConfig.tiny(attention_pattern="  ").attention_pattern is None
    model = make_model(seed=1, **TINY, attention_pattern="swin:8,softcap:30")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = type(model).from_pretrained(tmp_path / "ckpt")
    assert loaded.config.attention_pattern == "swin:8,softcap:30"
    assert type(model).from_pretrained(tmp_path / "ckpt", attention_pattern="alibi").config.attention_pattern == "alibi"


def _run_pretrain_cli(argv, monkeypatch, capsys):
    """In-process pretrain-mpnet with the training itself replaced: returns (exit code, stderr, run config)."""
    from mpnet_cli import pretrain as cli

    captured = {}
    monkeypatch.setattr("mpnet.training.pretrain.pretrain", lambda cfg, out, **kwargs: captured.update(cfg=cfg))
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err, captured.get("cfg")


@pytest.mark.parametrize("argv", [["--attention-pattern", "bloc:64"], ["model.attention_pattern=swin:1"]])
def test_cli_rejects_a_bad_pattern_in_one_line(argv, monkeypatch, capsys, tmp_path):
    code, err, cfg = _run_pretrain_cli(["--output-dir", str(tmp_path), *argv], monkeypatch, capsys)
    assert code == 2 and cfg is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain-mpnet: error: attention pattern")
    assert "window:W" in lines[0] and "softcap:C" in lines[0]


@pytest.mark.parametrize("argv,spec", [
    (["--attention-pattern", "swin:64,softcap:30"], "swin:64,softcap:30"),
    (["model.attention_pattern=block:64,alibi"], "block:64,alibi"),
    (["--attention-pattern", "alibi", "model.attention_pattern=alibi"], "alibi"),  # a flag and an override agree
])
def test_cli_maps_the_pattern_to_the_model_config(argv, spec, monkeypatch, capsys, tmp_path):
    # (a flag and an override that disagree are refused: test_config_validation.py)
    from mpnet.training.config import model_config

    code, _, cfg = _run_pretrain_cli(["--output-dir", str(tmp_path), *argv], monkeypatch, capsys)
    assert code == 0
    assert model_config(cfg.model, vocab_size=64).attention_pattern == spec
