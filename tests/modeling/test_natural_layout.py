"""With a sparse pattern the two-stream rows are put in natural (original-position) order so the window
is block-sparse. Proven here: the outputs do not depend on the layout, and the BlockMasks get sparse."""
import pytest
import torch

from mpnet import MPNetConfig, MPNetForPretraining
from mpnet.modeling.block_masks import make_two_stream_block_masks
from mpnet.modeling.patterns import window_spec
from mpnet.modeling.masks import natural_order


def permuted_layout_logits(model, input_ids, positions, m):
    """The forward pass without reordering: the permuted layout, rules on raw row indices."""
    b, n = input_ids.shape
    masks = input_ids.new_full((b, 2 * m), model.config.mask_token_id)
    ids = torch.cat([input_ids, masks], 1)
    pos = torch.cat([positions, positions[:, n - m:], positions[:, n - m:]], 1)
    hidden = model.mpnet.encoder(model.mpnet.embeddings(ids, pos), pos, n, m)
    return model.lm_head(hidden[:, n + m:])


@pytest.mark.parametrize("flex", [False, True])
@pytest.mark.parametrize("pattern", [dict(sliding_window_size=5), dict(attention_pattern="block:8,alibi")])
def test_natural_order_gives_the_permuted_layout_outputs(flex, pattern):
    torch.manual_seed(0)
    cfg = MPNetConfig.tiny(vocab_size=64, mask_token_id=63, hidden_size=32, num_attention_heads=2,
                           intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           use_flex_attention=flex, **pattern)
    model = MPNetForPretraining(cfg).eval()
    n, m = 40, 6
    input_ids = torch.randint(5, 60, (3, n))
    positions = torch.stack([torch.randperm(n) for _ in range(3)])
    input_ids[2, :4] = cfg.pad_token_id  # padding sits in the context part
    with torch.no_grad():
        natural = model(input_ids, positions, m)
        permuted = permuted_layout_logits(model, input_ids, torch.where(input_ids == 1, -1, positions), m)
    torch.testing.assert_close(natural, permuted, rtol=0, atol=1e-5)


def computed_tile_share(block_mask):
    computed = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
    q_blocks, kv_blocks = block_mask.kv_num_blocks.shape[-1], block_mask.kv_indices.shape[-1]
    return float(computed) / (block_mask.kv_num_blocks.shape[0] * q_blocks * kv_blocks)


def test_window_is_block_sparse_only_in_natural_order():
    torch.manual_seed(0)
    n, m, window = 2048, 307, 64
    perm = torch.stack([torch.randperm(n) for _ in range(2)])
    positions = torch.cat([perm, perm[:, n - m:], perm[:, n - m:]], 1)
    scattered = make_two_stream_block_masks(positions, n, m, window_spec(window))[0]
    layout = natural_order(positions, n, m)
    sorted_masks = make_two_stream_block_masks(positions.gather(1, layout), n, m, window_spec(window), layout=layout)
    dense_share, sparse_share = computed_tile_share(scattered), computed_tile_share(sorted_masks[0])
    print(f"content-stream tiles computed: permuted {dense_share:.2f}, natural {sparse_share:.2f}")
    assert dense_share > 0.9
    assert sparse_share < 0.35


@pytest.mark.parametrize("flex", [False, True])
def test_natural_order_with_documents_gives_the_permuted_layout_outputs(flex):
    torch.manual_seed(1)
    cfg = MPNetConfig.tiny(vocab_size=64, mask_token_id=63, hidden_size=32, num_attention_heads=2,
                           intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           use_flex_attention=flex)
    model = MPNetForPretraining(cfg).eval()
    n, m = 30, 5
    natural_docs = torch.tensor([0] * 12 + [1] * 10 + [2] * 8)
    natural_pos = torch.cat([torch.arange(12), torch.arange(10), torch.arange(8)])  # restart per document
    perm = torch.stack([torch.randperm(n) for _ in range(2)])
    documents, positions = natural_docs[perm], natural_pos[perm]
    input_ids = torch.randint(5, 60, (2, n))
    with torch.no_grad():
        natural = model(input_ids, positions, m, document_ids=documents)
        b = input_ids.shape[0]
        ids = torch.cat([input_ids, input_ids.new_full((b, 2 * m), cfg.mask_token_id)], 1)
        pos = torch.cat([positions, positions[:, n - m:], positions[:, n - m:]], 1)
        docs = torch.cat([documents, documents[:, n - m:], documents[:, n - m:]], 1)
        hidden = model.mpnet.encoder(model.mpnet.embeddings(ids, pos), pos, n, m, docs)
        permuted = model.lm_head(hidden[:, n + m:])
    torch.testing.assert_close(natural, permuted, rtol=0, atol=1e-5)
