"""MPNet encoder, LM head and classification head, with HF transformers' parameter names.

Read top to bottom: embeddings -> layer -> encoder (relative bias once per forward, backend chosen by
the factory) -> heads -> `MPNetForPretraining` (two-stream pretraining, single-stream encode) ->
`MPNetForSequenceClassification` (fine-tuning). Checkpoints are plain HF MPNet directories
(see checkpoint.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .backends import attention_backend, two_stream_self_attention_factory
from ..errors import UserError
from .config import MPNetConfig
from .masks import natural_order, stream_lengths
from .packing import document_starts, positions_within_documents

PADDING_IDX = 1  # HF/fairseq: position ids start at padding_idx + 1 = 2; padding gets padding_idx

# The pretraining objectives of the original MPNet code (its `task_compute`; docs/objectives.md), by how
# many copies of the predicted entries are appended to the n permuted tokens (each a <mask> at the
# predicted token's position) and by the two-stream layout that masks them (masks.STREAM_RULES):
# mpnet: MASK + QUERY, "mpnet"; plm: QUERY only, "plm"; mlm: none (single stream, m = 0 rows).
# The logits are read at the last pred_size rows of the stacked layout in every case.
OBJECTIVES = {"mpnet": (2, "mpnet"), "mlm": (0, "mpnet"), "plm": (1, "plm")}


class SequenceTooLong(UserError):
    pass


class MPNetEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=PADDING_IDX)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, positions):
        """positions: original 0-based positions, -1 for padding (-> padding_idx)."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + PADDING_IDX + 1)
        return self.dropout(self.LayerNorm(x))


class MPNetAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = two_stream_self_attention_factory(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, state, first_row: int = 0):
        """(B, L, H) -> (B, L - first_row, H): the rows from first_row on (the last layer computes only the
        rows the loss reads). A backend module that can compute a subset of query rows says so with
        `computes_row_subset`; any other computes every row and the subset is sliced off."""
        if first_row and getattr(self.attn, "computes_row_subset", False):
            attended = self.attn(hidden, state, first_row)
        else:
            attended = self.attn(hidden, state)[:, first_row:]
        return self.LayerNorm(self.dropout(attended) + hidden[:, first_row:])


class MPNetIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]  # HF's table, so every hidden_act computes as in HF

    def forward(self, x):
        return self.activation(self.dense(x))


class MPNetOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class MPNetLayer(nn.Module):
    """Post-LN transformer layer; content and query streams share every weight."""

    def __init__(self, config):
        super().__init__()
        self.attention = MPNetAttention(config)
        self.intermediate = MPNetIntermediate(config)
        self.output = MPNetOutput(config)

    def forward(self, hidden, state, first_row: int = 0):
        hidden = self.attention(hidden, state, first_row)
        return self.output(self.intermediate(hidden), hidden)


class MPNetEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([MPNetLayer(config) for _ in range(config.num_hidden_layers)])
        self.pattern = config.pattern
        # One (buckets x heads) table shared by all layers.
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads)

    def forward(self, hidden, positions, n: int, m: int, document_ids=None, layout=None, streams="mpnet",
                first_row: int = 0):
        """hidden/positions/document_ids: (B, n + 2m, ...) in the two-stream layout (m = 0: single stream;
        streams="plm": (B, n + m, ...), the permuted-LM layout of masks.py); layout: each row's slot in
        that layout when the rows were put in natural order. first_row: the last layer computes and
        returns only the rows from first_row on (B, L - first_row, H): the others feed no later layer."""
        cfg = self.config
        make_state = attention_backend(cfg.attention_backend).make_state
        rules = dict(pattern=self.pattern, document_ids=document_ids, layout=layout)
        if streams != "mpnet":
            rules["streams"] = streams
        # Masks and relative bias once per forward, shared by the layers (a pattern that alternates by
        # layer, swin, gets one state per layer parity: two at most).
        states = [make_state(positions, n, m, self.relative_attention_bias.weight, cfg.relative_attention_max_distance,
                             layer=parity, **rules)
                  for parity in range(self.pattern.layer_variants)]
        last = len(self.layer) - 1
        for index, layer in enumerate(self.layer):
            hidden = layer(hidden, states[index % len(states)], first_row if index == last else 0)
        return hidden


class MPNetBackbone(nn.Module):
    """HF's `MPNetModel` without the pooler: saved under the prefix `mpnet.`."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = MPNetEmbeddings(config)
        self.encoder = MPNetEncoder(config)


class MPNetLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (tied to the token embeddings) + bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x):
        return F.linear(self.layer_norm(F.gelu(self.dense(x))), self.decoder.weight, self.bias)


class MPNetClassificationHead(nn.Module):
    """<s> token -> dropout -> dense -> tanh -> dropout -> out_proj (HF's head)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden):
        return self.classify(hidden[:, 0])

    def classify(self, features):
        """(N, H) <s> features -> (N, num_labels) logits."""
        x = self.dropout(features)
        return self.out_proj(self.dropout(torch.tanh(self.dense(x))))


def _init_weights(module, std):
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _MPNetBase(nn.Module):
    """Shared by the pretraining and classification models: single-stream encoding and checkpoints."""

    hf_architecture = ""

    def __init__(self, config: MPNetConfig):
        super().__init__()
        self.config = config
        self.mpnet = MPNetBackbone(config)

    def _check_length(self, length):
        if length > self.config.max_sequence_length:
            raise SequenceTooLong(
                f"sequence of {length} tokens is longer than the position table allows "
                f"({self.config.max_sequence_length} = max_position_embeddings - 2); "
                "shorten the input or use a config with more max_position_embeddings")

    def encode(self, input_ids, attention_mask=None, document_ids=None):
        """Single-stream bidirectional encoding in natural order: (B, n) -> (B, n, H).

        attention_mask: 1 for real tokens, 0 for padding; default: input_ids != pad_token_id.
        document_ids: (B, n) for packed rows (see packing.py): positions restart at each run of equal
        ids and a token attends only within its document.
        """
        self._check_length(input_ids.shape[1])
        real = input_ids.ne(self.config.pad_token_id) if attention_mask is None else attention_mask.bool()
        if document_ids is None:
            positions = torch.where(real, real.long().cumsum(1) - 1, -1)
        else:
            positions = positions_within_documents(real, document_ids)
        hidden = self.mpnet.embeddings(input_ids, positions)
        return self.mpnet.encoder(hidden, positions, input_ids.shape[1], 0, document_ids)

    def save_pretrained(self, path, tokenizer=None):
        from .checkpoint import save_pretrained

        save_pretrained(self, path, tokenizer)

    @classmethod
    def from_pretrained(cls, path, **config_overrides):
        """Load any HF MPNet directory (ours, MPNetForMaskedLM, MPNetModel, sentence-transformers...).

        config_overrides replace config fields, e.g. use_flex_attention=True, attention_pattern="window:256".
        """
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, **config_overrides)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MPNetForPretraining(_MPNetBase):
    """MPNet with its LM head: two-stream masked-and-permuted pretraining (or the MLM / PLM objectives),
    single-stream MLM."""

    hf_architecture = "MPNetForMaskedLM"

    def __init__(self, config: MPNetConfig):
        super().__init__(config)
        self.lm_head = MPNetLMHead(config)
        self.apply(lambda module: _init_weights(module, config.initializer_range))
        self.tie_weights()

    def tie_weights(self):
        self.lm_head.decoder.weight = self.mpnet.embeddings.word_embeddings.weight

    def forward(self, input_ids, positions, pred_size: int, attention_mask=None, document_ids=None,
                objective: str = "mpnet", appended_ids=None):
        """Two-stream MPNet: logits of the predicted tokens, (B, pred_size, vocab), in rank order.

        input_ids (B, n): tokens in permuted order; the last pred_size are the predicted ones (real tokens
        when appended_ids carries their corrupted inputs, the collator's default; else already corrupted). positions (B, n): ORIGINAL 0-based position of each. Padding (attention_mask 0, or
        input_ids == pad_token_id) is never attended. The pred_size <mask> entries of both streams are
        appended here, at the predicted tokens' positions (position compensation). document_ids (B, n),
        optional, permuted like positions: a token attends only within its document; the appended
        entries belong to their predicted token's document.

        objective (OBJECTIVES, docs/objectives.md): "mpnet" as above; "mlm": one stream over the n tokens
        (the predicted ones corrupted by the collator), logits at the predicted ones; "plm": the n tokens
        uncorrupted as the content stream and one <mask> query per predicted token, no MASK entries.
        appended_ids: (B, pred_size) inputs of both appended sections (MASK entries and queries) instead of
        <mask>, mpnet only: the original MPNet code's layout (collator corrupted_input="appended").
        """
        batch, n = input_ids.shape
        m = int(pred_size)
        self._check_length(n)
        if objective not in OBJECTIVES:
            raise UserError(f"unknown pretraining objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")
        copies, streams = OBJECTIVES[objective]
        if copies and self.config.mask_token_id is None:
            raise UserError(f"this model's config has no mask_token_id (its vocabulary has {self.config.vocab_size} "
                            "entries, not MPNet's 30527); set config.mask_token_id to its <mask> id for two-stream "
                            "pretraining")
        real = input_ids.ne(self.config.pad_token_id) if attention_mask is None else attention_mask.bool()
        positions = torch.where(real, positions, -1)
        predicted_positions = positions[:, n - m:]
        if appended_ids is not None:  # the original's layout: corrupted tokens in both appended sections
            if copies != 2 or appended_ids.shape != (batch, m):
                raise UserError(f"appended_ids ({tuple(appended_ids.shape)}) are the mpnet objective's (B, pred_size) "
                                f"inputs of the appended entries; got objective {objective!r}, pred_size {m}")
            masks = appended_ids.repeat(1, 2)
        else:
            masks = input_ids.new_full((batch, copies * m), self.config.mask_token_id if copies else 0)
        all_ids = torch.cat([input_ids, masks], dim=1)
        all_positions = torch.cat([positions] + [predicted_positions] * copies, dim=1)
        if document_ids is not None:
            predicted_documents = document_ids[:, n - m:]
            document_ids = torch.cat([document_ids] + [predicted_documents] * copies, dim=1)
        streams_m = m if copies else 0  # mlm: single-stream rows, every token context
        layout = None
        if self.mpnet.encoder.pattern.masks or document_ids is not None:  # sparse: natural order is block-sparse
            layout = natural_order(all_positions, n, streams_m, document_ids, streams)
            all_ids, all_positions = all_ids.gather(1, layout), all_positions.gather(1, layout)
            if document_ids is not None:
                document_ids = document_ids.gather(1, layout)
        first = stream_lengths(n, streams_m, streams)[1] - m  # the predictions: the last m slots of the layout
        hidden = self.mpnet.embeddings(all_ids, all_positions)
        # The loss reads the m predicted rows only: in the two-stream layout they are the last m, so the last
        # layer computes those alone (its content rows, (n + m) of n + 2m for mpnet, would feed nothing).
        # In natural order (sparse patterns, documents) they are scattered: every row is computed.
        hidden = self.mpnet.encoder(hidden, all_positions, n, streams_m, document_ids, layout, streams,
                                    first_row=first if layout is None else 0)
        if layout is None:
            predicted = hidden
        else:  # back to rank order: slot first + r sits in the natural row where layout == first + r
            rows = torch.argsort(layout, dim=1)[:, first:]
            predicted = hidden.gather(1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.lm_head(predicted)

    def mlm_logits(self, input_ids, attention_mask=None):
        """Single-stream LM logits, (B, n, vocab): what HF's MPNetForMaskedLM computes."""
        return self.lm_head(self.encode(input_ids, attention_mask))


class MPNetForSequenceClassification(_MPNetBase):
    """Sentence(-pair) classification (num_labels > 1) or regression (num_labels == 1)."""

    hf_architecture = "MPNetForSequenceClassification"

    def __init__(self, config: MPNetConfig):
        super().__init__(config)
        self.classifier = MPNetClassificationHead(config)
        self.apply(lambda module: _init_weights(module, config.initializer_range))

    def forward(self, input_ids, attention_mask=None, document_ids=None, starts=None):
        """Logits, one row per example: (B, num_labels) read at each row's <s> (HF's model).

        Packed rows (packing.py: several examples per row, isolated): pass document_ids (R, T) and
        get one logit row per document, read at its first token (<s>), equal to the example's logits
        alone. starts (N, 2): the (row, column) of each example's first token, in the order wanted
        (`PackedBatch.starts`: input order); default with document_ids: every document, row-major.
        """
        hidden = self.encode(input_ids, attention_mask, document_ids)
        if starts is None and document_ids is None:
            return self.classifier(hidden)
        if starts is None:
            starts = document_starts(document_ids)
        starts = starts.to(hidden.device)
        return self.classifier.classify(hidden[starts[:, 0], starts[:, 1]])
