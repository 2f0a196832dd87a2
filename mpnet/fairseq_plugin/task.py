"""The task: fairseq's data-bin pipeline in, batches from this project's MPNetCollator out."""

import os
from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.data import Dictionary, FairseqDataset, PrependTokenDataset, TokenBlockDataset, data_utils

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from mpnet.data.collator import CORRUPTED_INPUTS, MPNetCollator
from mpnet.modeling.model import OBJECTIVES

BREAK_MODES = ChoiceEnum(["none", "complete", "complete_doc", "eos"])
INPUT_MODES = ChoiceEnum(list(OBJECTIVES))  # the original task's --input-mode = training.objective
CORRUPTED_INPUT = ChoiceEnum(list(CORRUPTED_INPUTS))  # data.corrupted_input


@dataclass
class MaskedPermutationLMConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "data-bin directory (colon-separated: one per epoch)"})
    sample_break_mode: BREAK_MODES = field(default="complete", metadata={"help": "as the original MPNet task"})
    tokens_per_sample: int = field(default=512, metadata={"help": "block length, <s> included"})
    pred_prob: float = field(default=0.15, metadata={"help": "fraction of each block that is predicted"})
    input_mode: INPUT_MODES = field(default="mpnet", metadata={
        "help": "the objective, as the original task's --input-mode: mpnet, mlm or plm (docs/objectives.md)"})
    corrupted_input: CORRUPTED_INPUT = field(default="appended", metadata={
        "help": "mpnet only: 'appended' (default) is the original code's inputs (real predicted tokens in the content "
                "stream, the corrupted ones appended); 'content' the corrupted ones in the content stream"})
    seed: int = II("common.seed")


class PermutedBlocks(FairseqDataset):
    """Blocks of token ids; collater() is MPNetCollator, seeded by (seed, epoch and first block id, 0) so a batch
    is the same whichever DataLoader worker builds it."""

    def __init__(self, blocks, collator: MPNetCollator, pad_idx: int):
        self.blocks, self.collator, self.pad_idx, self.epoch = blocks, collator, pad_idx, 1

    def __getitem__(self, index):
        return {"id": index, "source": self.blocks[index]}

    def __len__(self):
        return len(self.blocks)

    @property
    def sizes(self):
        return self.blocks.sizes

    def num_tokens(self, index):
        return self.blocks.sizes[index]

    def size(self, index):
        return self.blocks.sizes[index]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def collater(self, samples):
        if not samples:
            return {}
        ids = torch.tensor([s["id"] for s in samples])
        batch = self.collator([s["source"].numpy() for s in samples], step=self.epoch * len(self) + int(ids.min()),
                              rank=0)
        target = batch["targets"].masked_fill(batch["targets"] == -100, self.pad_idx)  # the criterion's ignore index
        inputs = ("input_ids", "positions", "pred_size", "attention_mask", "appended_ids")
        return {"id": ids, "nsentences": len(samples), "ntokens": int((target != self.pad_idx).sum()),
                "net_input": {k: batch[k] for k in inputs if k in batch}, "target": target}


@register_task("masked_permutation_lm", dataclass=MaskedPermutationLMConfig)
class MaskedPermutationLMTask(FairseqTask):
    def __init__(self, cfg, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.mask_idx = dictionary.add_symbol("<mask>")  # as the original task: right after dict.txt

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        paths = utils.split_paths(cfg.data)
        return cls(cfg, Dictionary.load(os.path.join(paths[0], "dict.txt")))

    def collator(self) -> MPNetCollator:
        d = self.dictionary
        specials = [d.bos(), d.pad(), d.eos(), d.unk(), self.mask_idx] + [
            i for i, s in enumerate(d.symbols) if s.startswith("madeupword")]
        return MPNetCollator(len(d), d.pad(), self.mask_idx, specials, pred_prob=self.cfg.pred_prob, seed=self.cfg.seed,
                             objective=str(self.cfg.input_mode), corrupted_input=str(self.cfg.corrupted_input))

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        dataset = data_utils.load_indexed_dataset(split_path, self.dictionary, combine=combine)
        if dataset is None:
            raise FileNotFoundError(f"Dataset not found: {split} ({split_path})")
        blocks = TokenBlockDataset(dataset, dataset.sizes, self.cfg.tokens_per_sample - 1, pad=self.dictionary.pad(),
                                   eos=self.dictionary.eos(), break_mode=self.cfg.sample_break_mode)
        blocks = PrependTokenDataset(blocks, self.dictionary.bos())
        self.datasets[split] = PermutedBlocks(blocks, self.collator(), self.dictionary.pad())

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary

    def max_positions(self):
        return self.cfg.tokens_per_sample



