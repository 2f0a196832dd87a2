"""mpnet: MPNet pretraining (masked and permuted LM, two-stream attention) with dense, FlexAttention and Triton
attention backends (mpnet/modeling/backends.py)."""
from .modeling import *  # noqa: F401,F403
from .modeling import __all__

__version__ = "0.1.0"
