"""Cost of the learnable relative bias in flex two-stream attention: gradient strategies side by side.

One content+query call pair, fwd+bwd, bf16, 16,384 tokens per batch, 12 heads x 64, on CUDA:
  sdpa: flash without bias (ceiling); nobias: flex, no score_mod; nograd: bias without gradient;
  plain: bias gathered from one (heads x distance) table (gradient = atomics into few addresses);
  repRxK: the table replicated per (q_idx % R, kv_idx % K), so atomics spread; autograd sums copies.
Usage: python scripts/flex_bias_variants.py [sdpa,nobias,nograd,plain,rep128x1,...]
"""
import sys
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention, create_block_mask
sys.path.insert(0, ".")
from mpnet.modeling.masks import two_stream_visible, relative_bias_by_distance, distance_index
torch._dynamo.config.cache_size_limit = 256
try: torch._dynamo.config.recompile_limit = 256
except Exception: pass
flex = torch.compile(flex_attention, dynamic=False)
cbm = torch.compile(create_block_mask, dynamic=False)
dev = "cuda"; H, D, TOK = 12, 64, 16384
MAXD = 128

def bench(fn, reps=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts)//2]

def run(L, variant):
    B = TOK // L; m = round(0.15 * L); n = L; kv = n + m
    pos = torch.stack([torch.randperm(n, device=dev) for _ in range(B)])
    allpos = torch.cat([pos, pos[:, n-m:], pos[:, n-m:]], 1)
    q = torch.randn(B, H, n + 2*m, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, H, kv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, H, kv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    table = torch.randn(32, H, device=dev, requires_grad=True)
    def cmask(b, h, qi, ki): return two_stream_visible(qi, ki, n, m)
    def qmask(b, h, qi, ki): return two_stream_visible(qi + kv, ki, n, m)
    bm_c = cbm(cmask, None, None, kv, kv, device=dev)
    bm_q = cbm(qmask, None, None, m, kv, device=dev)
    if variant == "sdpa":
        def step():
            o = F.scaled_dot_product_attention(q, k, v)
            o.sum().backward()
        return bench(step)
    def step():
        if variant == "nobias":
            sc = sq = None
        else:
            dist = relative_bias_by_distance(table if variant != "nograd" else table.detach(), MAXD, 32)
            if variant.startswith("rep"):
                rq, rk = map(int, variant[3:].split("x"))
                rep = dist[:, None, None, :].expand(H, rq, rk, dist.shape[1]).contiguous()
                def sc(s, b, h, qi, ki):
                    return s + rep[h, qi % rq, ki % rk, distance_index(allpos[b, qi], allpos[b, ki], MAXD)]
                def sq(s, b, h, qi, ki):
                    return s + rep[h, qi % rq, ki % rk, distance_index(allpos[b, qi + kv], allpos[b, ki], MAXD)]
            else:
                def sc(s, b, h, qi, ki):
                    return s + dist[h, distance_index(allpos[b, qi], allpos[b, ki], MAXD)]
                def sq(s, b, h, qi, ki):
                    return s + dist[h, distance_index(allpos[b, qi + kv], allpos[b, ki], MAXD)]
        oc = flex(q[:, :, :kv], k, v, score_mod=sc, block_mask=bm_c)
        oq = flex(q[:, :, kv:], k, v, score_mod=sq, block_mask=bm_q)
        (oc.sum() + oq.sum()).backward()
    return bench(step)

variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["sdpa", "nobias", "nograd", "plain", "rep16x1", "rep64x1", "rep16x16", "rep128x4"]
for L in [512, 2048]:
    for var in variants:
        try:
            t = run(L, var)
            print(f"L={L:5d} {var:10s} {t:8.2f} ms", flush=True)
        except Exception as e:
            print(f"L={L:5d} {var:10s} FAIL {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch._dynamo.reset()
