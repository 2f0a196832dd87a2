"""transformers classes for checkpoints that transformers' own MPNet would load into another function.

transformers' `MPNetModel` attends over the whole sequence and saturates the relative buckets at 128.
A model trained with a sliding window, an attention pattern or another bucket distance
(`MPNetConfig.matches_transformers_mpnet` is False) used to load there without a word and compute
something else. `save_pretrained` (modeling/checkpoint.py) therefore writes such a checkpoint with
`model_type: "mpnet_pattern"`, an `auto_map` naming the classes below, and its SHIM_FILE beside it: a
few lines that subclass them, so the code lives in this package and the checkpoint holds only names.

What transformers (5.24) does with such a directory:
- `AutoConfig` / `AutoModel` / `AutoModelForMaskedLM` / `AutoModelForSequenceClassification`
  `.from_pretrained(path)`, and `pipeline(...)`, which loads through them, refuse with transformers'
  ValueError "The repository PATH contains custom code which must be executed to correctly load the
  model. ... Please pass the argument `trust_remote_code=True` to allow custom code to be run."
  At a terminal it first asks "Do you wish to run the custom code? [y/N]" for 15 s
  (`resolve_trust_remote_code`); no, no answer, or no terminal (EOF) ends in that error.
  `trust_remote_code=False` gives the error at once.
- With `trust_remote_code=True` it copies SHIM_FILE into HF_MODULES_CACHE (default
  ~/.cache/huggingface/modules), checks that its import (`mpnet`) is installed (otherwise an
  ImportError naming `mpnet`: install this repository's package), imports it and builds the classes
  below: our modules, so our function, pattern included (tests/modeling/test_transformers_loading.py:
  bitwise equal to `MPNetForPretraining`). Config fields can be overridden as usual, e.g.
  `attention_backend="dense"` for a checkpoint trained with the triton backend, on a CPU.
- The concrete classes `transformers.MPNetForMaskedLM` / `MPNetModel` `.from_pretrained(path)` ignore
  auto_map: they load the weights (every key matches) into full attention and say so only in the
  warning "You are using a model of type `mpnet_pattern` to instantiate a model of type `mpnet`. ...".
  Nothing in a checkpoint can stop a concrete class short of making the weights unreadable to it,
  which would break the classes here too; so this case is documented, not blocked.
- `AutoTokenizer.from_pretrained(path)` reads the config too, so it asks the same question at a
  terminal (and loads the tokenizer whatever the answer); pass trust_remote_code (True or False).

Forward arguments: input_ids and attention_mask (1 = token, 0 = padding; default input_ids != pad),
plus labels for a loss and return_dict; position_ids, inputs_embeds and attention or hidden-state
outputs are not supported (a TypeError, not an ignored argument).
"""
from __future__ import annotations

import transformers
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

# The checkpoint format (SHIM_FILE, AUTO_MAP, the config class) is modeling/checkpoint.py's, which writes it;
# the shim's classes subclass hub.MPNetPatternConfig and the classes below.
from .modeling.checkpoint import PATTERN_CLASSES, MPNetPatternConfig
from .modeling.model import (
    MPNetBackbone,
    MPNetClassificationHead,
    MPNetForPretraining,
    MPNetLMHead,
    _MPNetBase,
)


class MPNetPatternPreTrainedModel(transformers.PreTrainedModel):
    """Holds our backbone under `mpnet.`, as our checkpoints name it, in every class below (so each
    loads any of our checkpoints key for key; a missing head is initialised and reported by transformers)."""

    config_class = MPNetPatternConfig
    base_model_prefix = "mpnet"

    # Single-stream encoding exactly as our models do it (positions from the mask, the pattern applied
    # by the encoder): the same functions, not a copy of them.
    encode = _MPNetBase.encode
    _check_length = _MPNetBase._check_length

    def __init__(self, config: MPNetPatternConfig):
        super().__init__(config)
        self.mpnet = MPNetBackbone(config)

    def _init_weights(self, module):
        """transformers' defaults are our initialisation (model._init_weights) for Linear, Embedding
        and LayerNorm; the LM head's bias is a bare Parameter, which it does not know."""
        super()._init_weights(module)
        if isinstance(module, MPNetLMHead):
            init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.mpnet.embeddings.word_embeddings

    def set_input_embeddings(self, embeddings):
        self.mpnet.embeddings.word_embeddings = embeddings


def _returned(output, return_dict):
    """return_dict=False asks for a plain tuple, as from any transformers model."""
    return output.to_tuple() if return_dict is False else output


class MPNetPatternModel(MPNetPatternPreTrainedModel):
    """The encoder: last_hidden_state = `MPNetForPretraining.encode` (no pooler, as in our checkpoints)."""

    def __init__(self, config: MPNetPatternConfig):
        super().__init__(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, return_dict=None):
        return _returned(BaseModelOutput(last_hidden_state=self.encode(input_ids, attention_mask)), return_dict)


class MPNetPatternForMaskedLM(MPNetPatternPreTrainedModel):
    """logits = `MPNetForPretraining.mlm_logits`; labels: token ids, -100 where no loss is taken."""

    mlm_logits = MPNetForPretraining.mlm_logits
    # our LM head always reads the word embeddings (model.py ties them; checkpoints omit the decoder)
    _tied_weights_keys = {"lm_head.decoder.weight": "mpnet.embeddings.word_embeddings.weight"}

    def __init__(self, config: MPNetPatternConfig):
        super().__init__(config)
        self.lm_head = MPNetLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=None):
        logits = self.mlm_logits(input_ids, attention_mask)
        loss = None if labels is None else self.loss_function(logits, labels, vocab_size=self.config.vocab_size)
        return _returned(MaskedLMOutput(loss=loss, logits=logits), return_dict)


class MPNetPatternForSequenceClassification(MPNetPatternPreTrainedModel):
    """logits = `MPNetForSequenceClassification` on padded rows, one example each (its head on each
    row's <s>). labels and loss as transformers' classifiers take them (config.problem_type, else
    regression for num_labels == 1, classes otherwise)."""

    def __init__(self, config: MPNetPatternConfig):
        super().__init__(config)
        self.classifier = MPNetClassificationHead(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=None):
        logits = self.classifier(self.encode(input_ids, attention_mask))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return _returned(SequenceClassifierOutput(loss=loss, logits=logits), return_dict)


AUTO_CLASSES = {auto: globals()[name] for auto, name in PATTERN_CLASSES.items()}  # KeyError: a class is missing
