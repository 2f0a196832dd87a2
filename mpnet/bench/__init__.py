"""Benchmarks behind `benchmark-mpnet` (docs/benchmarks.md), one module per measurement:

- harness: what they share: device, timer, time budget, cells and failures, the sweep over lengths,
  `configure_dynamo`; report: the one report writer (markdown + json + plots) and the progress line;
- attention: one layer's attention per cell and length (two-stream pair, single stream); problems: its
  settings, cells and inputs; triton_tiles, flex_variants: its --triton-tiles and --flex-variants entries;
- step: training steps: mpnet-base pretraining beside BERT-base, fine-tuning beside transformers' MPNet;
- patterns: each attention pattern on flex against SDPA with a dense mask;
- packing: packed against padded fine-tuning steps on real sentence lengths;
- mask_build: the flex backend's BlockMask builders against torch's create_block_mask.
"""
