"""Checkpoint conversion: original fairseq MPNet checkpoints and HF MPNet directories -> native."""
from .fairseq import convert_fairseq, load_fairseq_checkpoint, read_fairseq_dictionary
from .hf import convert_hf

__all__ = ["convert_fairseq", "convert_hf", "load_fairseq_checkpoint", "read_fairseq_dictionary"]
