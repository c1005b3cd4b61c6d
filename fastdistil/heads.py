"""Task heads on FastStudent with transformers' keys, outputs and `labels=` losses, for every architecture of
fastdistil/arch/ (the encoder is always `self.bert`; the key maps give transformers' `distilbert.` / `roberta.`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FastStudentConfig
from .hf_surface import PreTrainedSurface
from .model import FastStudent
from .outputs import ModelOutput


class _Head(PreTrainedSurface, nn.Module):
    base_prefix = "bert."
    add_pooling_layer = True
    optional_keys: tuple[str, ...] = ("pooler.",)  # may be missing from a checkpoint: newly initialised

    def __init__(self, config: FastStudentConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.bert = FastStudent(config, add_pooling_layer=self.add_pooling_layer and config.arch.head_pooler)

    def _init_head(self, *linears):
        for m in linears:
            nn.init.normal_(m.weight, 0.0, self.config.initializer_range)
            nn.init.zeros_(m.bias)

    from_pretrained = classmethod(FastStudent.from_pretrained.__func__)
    save_pretrained = FastStudent.save_pretrained
    from_hf = classmethod(FastStudent.from_hf.__func__)
    to_hf = FastStudent.to_hf

    @property
    def hf_architecture(self) -> str:
        return type(self).__name__.replace("FastStudent", self.config.arch.hf_name)


class FastStudentForSequenceClassification(_Head):
    """[CLS] -> the architecture's classifier (Arch.classifier): BERT pooled -> dropout -> linear; DistilBERT
    pre_classifier -> ReLU -> dropout -> classifier; RoBERTa dropout -> dense -> tanh -> dropout -> out_proj.
    Loss by problem_type as in transformers: regression (MSE) when num_labels == 1, single-label cross-entropy for
    integer labels, multi-label BCE-with-logits otherwise. Left-padded rows give transformers' logits on every
    architecture: the base model computes the position-0 row transformers computes from the pad token
    (``first_token``), for the pooler or for this head."""
    optional_keys = ("pooler.", "pre_classifier.", "classifier.")

    def __init__(self, config: FastStudentConfig):
        super().__init__(config)
        d, kind = config.hidden_size, config.arch.classifier
        self.bert.first_token = kind != "pooler"  # the classifier reads position 0 itself
        drop = config.extra.get("seq_classif_dropout" if kind == "pre_classifier" else "classifier_dropout")
        self.dropout = nn.Dropout(config.hidden_dropout_prob if drop is None else drop)
        if kind == "pre_classifier":
            self.pre_classifier = nn.Linear(d, d)
            self._init_head(self.pre_classifier)
        if kind == "dense_tanh":
            self.classifier = nn.ModuleDict(dict(dense=nn.Linear(d, d), out_proj=nn.Linear(d, self.num_labels)))
            self._init_head(self.classifier["dense"], self.classifier["out_proj"])
        else:
            self.classifier = nn.Linear(d, self.num_labels)
            self._init_head(self.classifier)

    def classify(self, cls):
        """(B, d) last-layer [CLS] rows -> (B, num_labels) logits, through the architecture's classifier."""
        kind = self.config.arch.classifier
        if kind == "pooler":
            return self.classifier(self.dropout(self.bert.pooler(cls)))
        if kind == "pre_classifier":
            return self.classifier(self.dropout(F.relu(self.pre_classifier(cls))))
        c = self.classifier
        return c["out_proj"](self.dropout(torch.tanh(c["dense"](self.dropout(cls)))))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states: bool = False, return_dict: bool = True, **kw):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        output_hidden_states=output_hidden_states, **kw)  # unknown keywords: TypeError
        logits = (self.classifier(self.dropout(out.pooler_output)) if out.pooler_output is not None
                  else self.classify(out.first_token))  # (B, num_labels)
        loss = None
        if labels is not None:
            pt = self.config.extra.get("problem_type")
            if pt is None:
                pt = ("regression" if self.num_labels == 1 else
                      "single_label_classification" if not labels.is_floating_point() else
                      "multi_label_classification")
            if pt == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1)) if self.num_labels == 1 \
                    else F.mse_loss(logits, labels.to(logits.dtype))
            elif pt == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        res = ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return res if return_dict else res.to_tuple()


class FastStudentForTokenClassification(_Head):
    """Every token -> dropout -> linear; cross-entropy over labels != -100. Give padded positions the label -100
    (DataCollatorForTokenClassification does): their logits come from a zero hidden state here, while transformers
    scores the pad tokens' hidden states, so a label other than -100 at padding makes the two losses differ."""
    add_pooling_layer = False
    optional_keys = ("pooler.", "classifier.")

    def __init__(self, config: FastStudentConfig):
        super().__init__(config)
        drop = config.extra.get("classifier_dropout")
        self.dropout = nn.Dropout(config.hidden_dropout_prob if drop is None else drop)
        self.classifier = nn.Linear(config.hidden_size, self.num_labels)
        self._init_head(self.classifier)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states: bool = False, return_dict: bool = True, **kw):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        output_hidden_states=output_hidden_states, **kw)  # unknown keywords: TypeError
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, L, num_labels)
        loss = None if labels is None else F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        res = ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return res if return_dict else res.to_tuple()


class FastStudentForQuestionAnswering(_Head):
    """Every token -> linear(2) -> start/end logits; loss = mean of start and end cross-entropies, positions
    clamped to the sequence length and ignored there, as transformers does. Padded positions get the lowest
    finite logit (they can never be an answer); transformers instead scores its padded hidden states, so its
    loss on a padded batch includes those positions and differs from ours, while unpadded batches agree."""
    add_pooling_layer = False
    optional_keys = ("pooler.", "qa_outputs.")

    def __init__(self, config: FastStudentConfig):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._init_head(self.qa_outputs)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None, output_hidden_states: bool = False,
                return_dict: bool = True, **kw):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        output_hidden_states=output_hidden_states, **kw)  # unknown keywords: TypeError
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)  # (B, L, 1) each
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()  # (B, L)
        if attention_mask is not None:
            pad = ~attention_mask.to(start.device, torch.bool)
            start = start.masked_fill(pad, torch.finfo(start.dtype).min)
            end = end.masked_fill(pad, torch.finfo(end.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            L = start.shape[1]
            sp, ep = start_positions.view(-1).clamp(0, L), end_positions.view(-1).clamp(0, L)
            loss = (F.cross_entropy(start, sp, ignore_index=L) + F.cross_entropy(end, ep, ignore_index=L)) / 2
        res = ModelOutput(loss=loss, start_logits=start, end_logits=end, hidden_states=out.hidden_states)
        return res if return_dict else res.to_tuple()


__all__ = ["FastStudentForSequenceClassification", "FastStudentForTokenClassification",
           "FastStudentForQuestionAnswering"]
