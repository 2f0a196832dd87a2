"""MPNet configuration: HF's `MPNetConfig` plus the fields this project adds.

Subclassing keeps `model_type: "mpnet"` in the `config.json` of every model transformers' own MPNet
computes (`matches_transformers_mpnet`), so transformers loads those checkpoints as ordinary MPNet
models; the extra fields ride along as plain attributes. The others are written as PATTERN_MODEL_TYPE
with classes transformers loads only under trust_remote_code (mpnet/hub.py).
"""
from __future__ import annotations

import transformers

from ..errors import UserError
from .backends import ATTENTION_BACKEND_NAMES
from .patterns import as_pattern, parse_attention_pattern


MPNET_MASK_TOKEN_ID = 30526  # <mask> in the MPNet WordPiece vocabulary (30527 entries)
# transformers' MPNet saturates its relative buckets at this distance, whatever the config says
# (relative_position_bucket's default max_distance)
TRANSFORMERS_MAX_DISTANCE = 128
# model_type of a checkpoint that transformers' own MPNet would load into another function (hub.py)
PATTERN_MODEL_TYPE = "mpnet_pattern"


def check_window(size, what: str = "sliding_window_size"):
    """A sliding window is a positive number of tokens (or None: no window)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise UserError(f"{what} must be a positive integer number of tokens, got {size!r}")


class MPNetConfig(transformers.MPNetConfig):
    """Accepts every field of `transformers.MPNetConfig`, plus:

    use_flex_attention: pick `FlexTwoStreamAttention` instead of the dense `RelativeMultiHeadAttention`.
    attention_backend: a name of backends.ATTENTION_BACKENDS (dense, flex, or triton: the hand-written
        kernels of triton_attention.py); default from use_flex_attention.
    sliding_window_size: if set, a token sees only ORIGINAL positions p with |p - q| <= w (= window:w).
    attention_pattern: a spec from patterns.py, e.g. 'block:64,softcap:30'; with sliding_window_size
        also set, the two are intersected.
    relative_attention_max_distance: distance at which the log-spaced relative buckets saturate.
    mask_token_id: id of <mask>, used for the appended two-stream entries (default: the MPNet vocabulary's,
        when the vocabulary is that large; None otherwise, and then only single-stream encoding works).
    """

    def __init__(
        self,
        vocab_size: int = 30527,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 514,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        pad_token_id: int = 1,
        bos_token_id: int = 0,
        eos_token_id: int = 2,
        mask_token_id: int | None = None,
        use_flex_attention: bool = False,
        attention_backend: str | None = None,
        sliding_window_size: int | None = None,
        attention_pattern: str | None = None,
        **kwargs,
    ):
        super().__init__(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            hidden_act=hidden_act,
            hidden_dropout_prob=hidden_dropout_prob,
            attention_probs_dropout_prob=attention_probs_dropout_prob,
            max_position_embeddings=max_position_embeddings,
            initializer_range=initializer_range,
            layer_norm_eps=layer_norm_eps,
            relative_attention_num_buckets=relative_attention_num_buckets,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        if hidden_size % num_attention_heads:
            raise UserError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
        check_window(sliding_window_size)
        if mask_token_id is None and vocab_size > MPNET_MASK_TOKEN_ID:
            mask_token_id = MPNET_MASK_TOKEN_ID  # the MPNet vocabulary's <mask>; other vocabularies must say theirs
        for name, token_id in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id),
                               ("eos_token_id", eos_token_id), ("mask_token_id", mask_token_id)):
            if token_id is not None and not 0 <= token_id < vocab_size:
                raise UserError(f"{name} {token_id} is outside the vocabulary (vocab_size {vocab_size}); "
                                f"special token ids must be below vocab_size")
        self.relative_attention_max_distance = relative_attention_max_distance
        self.mask_token_id = mask_token_id
        # attention_backend names the backend; use_flex_attention (the flag's name) is a view of it.
        if attention_backend not in (None, "flex") and use_flex_attention:
            raise UserError(f"use_flex_attention=true conflicts with attention_backend '{attention_backend}'; "
                            "give one of them")
        backend = attention_backend or ("flex" if use_flex_attention else "dense")
        if backend not in ATTENTION_BACKEND_NAMES:
            raise UserError(f"attention_backend '{backend}' is not one of {', '.join(ATTENTION_BACKEND_NAMES)}")
        self.attention_backend = backend
        self.sliding_window_size = None if sliding_window_size is None else int(sliding_window_size)
        spec = "" if attention_pattern is None else str(attention_pattern).strip()
        parse_attention_pattern(spec)  # a bad spec fails here, naming the valid ones
        self.attention_pattern = spec or None

    @property
    def use_flex_attention(self) -> bool:
        return self.attention_backend == "flex"

    @use_flex_attention.setter
    def use_flex_attention(self, flex: bool):
        """True: the flex backend; False: dense if it was flex, else unchanged (e.g. triton stays)."""
        if flex:
            self.attention_backend = "flex"
        elif self.attention_backend == "flex":
            self.attention_backend = "dense"

    @property
    def pattern(self):
        """The attention pattern every backend applies: attention_pattern, intersected with the sliding
        window when sliding_window_size is set. The one place the window folds into the pattern."""
        return as_pattern(self.attention_pattern, self.sliding_window_size)

    @property
    def matches_transformers_mpnet(self) -> bool:
        """Whether transformers' own MPNet computes this model's function from its weights: it attends
        over the whole sequence (no window, no pattern) and saturates the relative buckets at 128."""
        return (self.sliding_window_size is None and self.attention_pattern is None
                and self.relative_attention_max_distance == TRANSFORMERS_MAX_DISTANCE)

    @property
    def max_sequence_length(self) -> int:
        """Longest input the position table allows (positions start at padding_idx + 1 = 2)."""
        return self.max_position_embeddings - 2

    @classmethod
    def base(cls, **overrides) -> "MPNetConfig":
        """mpnet-base as in the paper (~109.5M parameters)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "MPNetConfig":
        """A CPU-sized model with the real MPNet vocabulary, for smoke runs and the embedded default."""
        settings = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                        max_position_embeddings=514)
        settings.update(overrides)
        return cls(**settings)
