"""The last layer computes only the rows the loss reads, and that changes nothing.

In the two-stream layout the m predicted rows are the last m (the query stream for mpnet and plm, the
last m content rows for mlm), so `MPNetForPretraining` asks the last layer for those alone (the rest of
that layer's output feeds nothing). The oracle is the same model computing every row of the last layer
and slicing (a backend module without `computes_row_subset` does exactly that): logits and every gradient
must agree. Dropout is 0 (with dropout on, fewer rows draw fewer random numbers: the same function, other
draws). Tolerance: rows computed in a smaller matmul may round differently; each output element is a
float32 dot product over at most max(hidden, intermediate, keys) = 256 terms, and rounding of such a sum
is bounded by about 256 * 2^-24 ~ 1.5e-5 relative to the sum of absolute terms, so rtol = atol = 2e-5
on O(1) values (observed on a CPU: logits identical, gradients within 1.2e-7).
"""
from __future__ import annotations

import pytest
import torch

from helpers import generator, make_model, pretraining_batch
from mpnet.modeling.attention import FlexTwoStreamAttention, RelativeMultiHeadAttention
from mpnet.modeling.triton_internals import INTERPRET, triton

TOL = dict(rtol=2e-5, atol=2e-5)


def _run(model, ids, positions, mask, m, objective):
    model.zero_grad(set_to_none=True)
    logits = model(ids, positions, m, attention_mask=mask, objective=objective)
    if torch.is_grad_enabled():
        logits.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _subset_and_every_row(model, module_class, objective, monkeypatch):
    n, m = 40, 6
    ids, positions, mask = pretraining_batch(generator(5), n, m, pad_counts=(0, 7))
    subset = _run(model, ids, positions, mask, m, objective)
    monkeypatch.setattr(module_class, "computes_row_subset", False)
    return subset, _run(model, ids, positions, mask, m, objective), m


@pytest.mark.parametrize("objective", ["mpnet", "mlm", "plm"])
def test_dense_last_layer_rows_equal_every_row(objective, monkeypatch):
    model = make_model(seed=3, num_hidden_layers=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    (subset_logits, subset_grads), (full_logits, full_grads), m = _subset_and_every_row(
        model, RelativeMultiHeadAttention, objective, monkeypatch)
    assert subset_logits.shape == (2, m, model.config.vocab_size)
    torch.testing.assert_close(subset_logits, full_logits, **TOL)
    assert subset_grads.keys() == full_grads.keys() and len(full_grads) == len(list(model.parameters()))
    for name in full_grads:
        torch.testing.assert_close(subset_grads[name], full_grads[name], **TOL, msg=name)


@pytest.mark.skipif(not (triton is not None and INTERPRET), reason="needs triton, run by its interpreter "
                    "(TRITON_INTERPRET=1 on a machine with triton); the GPU tests run the compiled kernels")
@pytest.mark.parametrize("objective", ["mpnet", "mlm", "plm"])
def test_triton_last_layer_plan_equals_every_row(objective, monkeypatch):
    """The triton backend's last layer runs a plan for the query rows it computes (its kernels' query_rows)."""
    from mpnet.modeling.triton_attention import TritonTwoStreamAttention

    model = make_model(seed=3, num_hidden_layers=3, hidden_size=32, num_attention_heads=2, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attention_backend="triton").train()
    (subset_logits, subset_grads), (full_logits, full_grads), _ = _subset_and_every_row(
        model, TritonTwoStreamAttention, objective, monkeypatch)
    torch.testing.assert_close(subset_logits, full_logits, **TOL)
    for name in full_grads:
        torch.testing.assert_close(subset_grads[name], full_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("objective", ["mpnet", "plm"])
def test_flex_last_layer_runs_the_query_stream_alone(objective, monkeypatch):
    """Flex on CPU runs forward only (no backward there); the GPU tests compare its gradients with dense."""
    model = make_model(seed=4, flex=True, num_hidden_layers=3)
    n, m = 40, 6
    ids, positions, mask = pretraining_batch(generator(6), n, m, pad_counts=(0, 7))
    calls = []
    original = FlexTwoStreamAttention.forward
    monkeypatch.setattr(FlexTwoStreamAttention, "forward",
                        lambda self, hidden, state, first_row=0: calls.append(first_row) or original(self, hidden,
                                                                                                      state, first_row))
    with torch.no_grad():
        subset, _ = _run(model, ids, positions, mask, m, objective)
        assert calls == [0, 0, n + m if objective == "mpnet" else n]
        monkeypatch.setattr(FlexTwoStreamAttention, "computes_row_subset", False)
        full, _ = _run(model, ids, positions, mask, m, objective)
    torch.testing.assert_close(subset, full, **TOL)


@pytest.mark.parametrize("objective", ["mpnet", "mlm"])
def test_compiled_by_layers_the_last_layer_rows_stay_a_constant(objective, monkeypatch):
    """compile_scope=layers (toolkit.compile_model): the last layer, called with first_row = the first predicted
    row where every other layer gets 0, compiles a graph of its own with that row a constant: no graph takes a
    symbolic int. Sharing the other layers' compiled code, dynamo's automatic dynamic shapes would make
    first_row a symbol on the last layer's recompile, and the triton backend would build its row plan over
    symbolic sizes (the H100's by-layers step at 128 x 512 failed in its first backward with such a graph).
    Dynamo's graphs are recorded and run as traced (no inductor): what is checked is what dynamo hands on."""
    from mpnet.training.toolkit import compile_model

    graphs = []

    def record(gm, example_inputs):
        graphs.append([type(x).__name__ for x in example_inputs if not isinstance(x, torch.Tensor)])
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=record))
    torch._dynamo.reset()
    model = make_model(seed=3, num_hidden_layers=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    n, m = 40, 6
    ids, positions, mask = pretraining_batch(generator(5), n, m, pad_counts=(0, 7))
    eager = _run(model, ids, positions, mask, m, objective)
    compile_model(model, "default", "layers")
    for _ in range(2):
        compiled = _run(model, ids, positions, mask, m, objective)
    torch._dynamo.reset()
    assert graphs == [[], []]  # the first two layers' graph and the last layer's; no SymInt input in either
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)  # the same ops, run as traced
