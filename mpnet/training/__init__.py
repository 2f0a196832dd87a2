"""Pretraining: run config, loop, checkpoints, distributed wrappers and metrics."""
