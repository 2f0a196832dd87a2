"""Checkpoint conversion: original fairseq MPNet checkpoints and HF MPNet directories -> native, and native ->
the original fairseq format."""
from .fairseq import convert_fairseq, load_fairseq_checkpoint, read_fairseq_dictionary
from .hf import convert_hf
from .to_fairseq import convert_to_fairseq

__all__ = ["convert_fairseq", "convert_hf", "convert_to_fairseq", "load_fairseq_checkpoint",
           "read_fairseq_dictionary"]
