"""The MPNet model: config, attention rules (masks.py) and patterns (patterns.py), backends (attention.py,
triton_attention.py) and their registry + factory (backends.py), encoder and heads, packing for inference
(packing.py)."""
from .attention import FlexAttentionUnavailable, FlexTwoStreamAttention, RelativeMultiHeadAttention
from .backends import ATTENTION_BACKENDS, AttentionBackend, BackendUnavailable, two_stream_self_attention_factory
from ..errors import UserError
from .block_masks import make_two_stream_block_masks
from .checkpoint import CheckpointError
from .config import MPNetConfig
from .model import MPNetForPretraining, MPNetForSequenceClassification, SequenceTooLong
from .packing import PackedBatch, pack
from .patterns import AttentionPattern, BadAttentionPattern, parse_attention_pattern

__all__ = [
    "UserError",
    "CheckpointError", "FlexAttentionUnavailable", "FlexTwoStreamAttention", "MPNetConfig", "MPNetForPretraining",
    "MPNetForSequenceClassification", "RelativeMultiHeadAttention", "SequenceTooLong",
    "ATTENTION_BACKENDS", "AttentionBackend", "BackendUnavailable", "make_two_stream_block_masks",
    "two_stream_self_attention_factory",
    "AttentionPattern", "BadAttentionPattern", "PackedBatch", "pack", "parse_attention_pattern",
]
