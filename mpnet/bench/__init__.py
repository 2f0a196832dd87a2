"""Benchmarks behind `benchmark-mpnet` (docs/benchmarks.md), one module per measurement:

- harness: what they share: device, timer, time budget, cells and failures, the report writer
  (markdown + json + plots), the progress line, `configure_dynamo`;
- attention: one layer's attention per backend and length (two-stream pair, single stream);
- step: training steps: mpnet-base pretraining beside BERT-base, fine-tuning beside transformers' MPNet;
- patterns: each attention pattern on flex against SDPA with a dense mask;
- packing: packed against padded fine-tuning steps on real sentence lengths.
"""
