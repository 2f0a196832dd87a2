"""The model: MPNetForPretraining behind fairseq's model interface, sized from the task's dictionary."""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from omegaconf import II

from mpnet.modeling import MPNetConfig, MPNetForPretraining


@dataclass
class MPNetModelConfig(FairseqDataclass):
    encoder_layers: int = field(default=12, metadata={"help": "layers"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "hidden size"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "feed-forward size"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "attention heads"})
    dropout: float = field(default=0.1, metadata={"help": "hidden dropout"})
    attention_dropout: float = field(default=0.1, metadata={"help": "attention dropout"})
    max_positions: int = II("task.tokens_per_sample")
    use_flex_attention: bool = field(default=False, metadata={"help": "FlexAttention backend (needs CUDA to train)"})
    sliding_window_size: Optional[int] = field(default=None, metadata={"help": "attend within N original positions"})


@register_model("mpnet_project", dataclass=MPNetModelConfig)
class MPNetFairseqModel(BaseFairseqModel):
    def __init__(self, model: MPNetForPretraining, objective: str = "mpnet"):
        super().__init__()
        self.model, self.objective = model, objective

    @classmethod
    def build_model(cls, cfg, task):
        d = task.source_dictionary
        config = MPNetConfig(
            vocab_size=len(d), hidden_size=cfg.encoder_embed_dim, num_hidden_layers=cfg.encoder_layers,
            num_attention_heads=cfg.encoder_attention_heads, intermediate_size=cfg.encoder_ffn_embed_dim,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attention_dropout,
            max_position_embeddings=cfg.max_positions + 2, pad_token_id=d.pad(), bos_token_id=d.bos(),
            eos_token_id=d.eos(), mask_token_id=task.mask_idx, use_flex_attention=cfg.use_flex_attention,
            sliding_window_size=cfg.sliding_window_size)
        return cls(MPNetForPretraining(config), objective=str(task.cfg.input_mode))

    def forward(self, input_ids, positions, pred_size, attention_mask=None, appended_ids=None):
        return self.model(input_ids, positions, pred_size, attention_mask, objective=self.objective,
                          appended_ids=appended_ids)

    def max_positions(self):
        return self.model.config.max_sequence_length


@register_model_architecture("mpnet_project", "mpnet_base")
def mpnet_base(cfg):
    """mpnet-base: 12 layers, 768 hidden, 12 heads, 3072 feed-forward (the dataclass defaults)."""
