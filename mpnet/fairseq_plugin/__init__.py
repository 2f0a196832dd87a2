"""fairseq-train plugin: task `masked_permutation_lm` and architecture `mpnet_base` around this project's
MPNetCollator and MPNetForPretraining (nothing here re-implements either).

    fairseq-train DATA_BIN --user-dir $(python -c 'import mpnet.fairseq_plugin as p, os; print(os.path.dirname(p.__file__))') \
        --task masked_permutation_lm --arch mpnet_base --criterion cross_entropy [--use-flex-attention] \
        [--sliding-window-size N] --batch-size 8 --optimizer adam --lr 1e-4 ...

fairseq's own data pipeline reads the data-bin (TokenBlockDataset with --sample-break-mode, <s> prepended, as
the original MPNet task does); the collator permutes and masks each batch exactly as pretrain-mpnet would, in
the fairseq dictionary's id space (dict.txt + the task's <mask>); fairseq's stock cross_entropy criterion
scores the predicted part (its ignore index, <pad>, marks padded targets). Checkpoints hold this project's
parameter names under `model.`; `convert-mpnet fairseq checkpoint_last.pt --dict DATA_BIN/dict.txt` reads them.
See docs/fairseq.md.
"""
from .task import MaskedPermutationLMTask  # noqa: F401  (registers the task)
from .model import MPNetFairseqModel  # noqa: F401  (registers the model and mpnet_base)
