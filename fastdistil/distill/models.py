"""Teachers and students for distillation, and their packed forward with taps.

A teacher or student is a FastStudent, a FastStudentForSequenceClassification, or a FastStudentForMaskedLM (below:
BERT's MLM head with transformers' keys, decoder tied to the word embeddings). `forward_side` runs one of them
on a packed Batch and returns a `Side`: the hidden states and q, k, v of the layers asked for (FastStudent's taps:
attention probabilities are never materialised), the [CLS] rows, mean-pooled sentence embeddings and logits.

Layer numbering, used by every objective: hidden state 0 is the embeddings' output and hidden state i the output
of layer i (1-based, as in transformers' hidden_states); attention layers are 1..N. Negative numbers count from
the end (-1 = last).
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import FastStudentConfig
from ..heads import FastStudentForSequenceClassification
from ..loading import load_state, read_weights, resolve_dir
from ..losses import mean_pool
from ..model import FastStudent

log = logging.getLogger("fastdistil")


class MaskedLMHead(nn.Module):
    """BERT's MLM head: dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings) + bias.
    Keys equal transformers' `cls.predictions.*`."""

    def __init__(self, cfg: FastStudentConfig, word_embeddings: nn.Embedding):
        super().__init__()
        d = cfg.hidden_size
        self.transform = nn.ModuleDict(dict(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d, eps=cfg.layer_norm_eps)))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self._words = [word_embeddings]  # not a submodule: the decoder weight is the encoder's embedding matrix
        self.approximate = cfg.gelu_approximate

    def forward(self, x):  # (M, d) -> (M, V)
        h = F.gelu(self.transform["dense"](x), approximate=self.approximate)
        h = self.transform["LayerNorm"](h)
        return F.linear(h, self._words[0].weight, self.bias)


class FastStudentForMaskedLM(nn.Module):
    """FastStudent + MLM head with transformers' BertForMaskedLM keys (bert.*, cls.predictions.*)."""
    base_prefix = "bert."
    optional_keys = ("pooler.", "cls.predictions.decoder.")
    hf_architecture = "BertForMaskedLM"

    def __init__(self, config: FastStudentConfig):
        super().__init__()
        if config.model_type != "bert":
            raise ValueError(f"FastStudentForMaskedLM holds BERT's MLM head (cls.predictions.*); model_type "
                             f"{config.model_type!r} has another one: use its base model (or a BERT teacher)")
        self.config = config
        self.bert = FastStudent(config, add_pooling_layer=False)
        self.cls = nn.ModuleDict(dict(predictions=MaskedLMHead(config, self.bert.embeddings.word_embeddings)))

    from_pretrained = classmethod(FastStudent.from_pretrained.__func__)
    save_pretrained = FastStudent.save_pretrained

    def mlm_logits(self, x):  # (M, d) -> (M, V)
        return self.cls["predictions"](x)


def body(model) -> FastStudent:
    """The FastStudent encoder inside a model (the model itself, or its `.bert`)."""
    return getattr(model, "bert", model)


def _architecture(directory: Path) -> str:
    cfg = json.loads((directory / "config.json").read_text())
    archs = cfg.get("architectures") or ["BertModel"]
    return archs[0]


def load_model(path, *, role: str = "model", device=None, dtype=None):
    """Load a checkpoint of any architecture in fastdistil/arch/ (BERT, DistilBERT, RoBERTa, XLM-R) as the fastdistil
    class matching its head: *ForSequenceClassification -> FastStudentForSequenceClassification, BertForMaskedLM /
    BertForPreTraining (with MLM weights) -> FastStudentForMaskedLM, anything else -> FastStudent (its base model).

    Raises:
        OSError: `path` is not a checkpoint directory (the message names the role: teacher or student).
    """
    try:
        directory = resolve_dir(path)
    except OSError as e:
        raise OSError(f"{role} {path}: {e}") from None
    arch = _architecture(directory)
    if arch.endswith("ForSequenceClassification"):  # every architecture's classifier: fastdistil/heads.py
        cls = FastStudentForSequenceClassification
    elif arch.endswith(("ForMaskedLM", "ForPreTraining")) and any(
            k.startswith("cls.predictions.") for k in read_weights(directory)):
        cls = FastStudentForMaskedLM
    else:
        cls = FastStudent
    try:
        model = cls.from_pretrained(directory, device=device, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{role} {path}: {e}") from None
    model.config.name_or_path = str(directory)  # model.name_or_path reads it (hf_surface.py)
    return model


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher only ever runs under torch.inference_mode."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def student_from_teacher(teacher: nn.Module, layers) -> nn.Module:
    """A student that copies the teacher's embeddings, the listed layers (0-based teacher layer indices, in the
    given order), pooler and head: DistilBERT's initialisation from a subset of teacher layers.

    Raises:
        ValueError: an index out of range, repeated, or more layers than the teacher has.
    """
    layers = [int(i) for i in layers]
    n = body(teacher).config.num_hidden_layers
    if not layers:
        raise ValueError("--student-layers is empty; list teacher layer indices such as 0,2,4")
    if len(layers) > n:
        raise ValueError(f"the student asks for {len(layers)} layers but the teacher has only {n}")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"student layers {bad} are out of range: the teacher's layers are numbered 0..{n - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"student layers {layers} repeat a layer")
    cfg = copy.deepcopy(body(teacher).config)
    cfg.num_hidden_layers = len(layers)
    student = type(teacher)(cfg) if type(teacher) is not FastStudent else \
        FastStudent(cfg, add_pooling_layer=body(teacher).pooler is not None)
    src = teacher.state_dict()
    dst = {}
    prefix = "bert." if hasattr(teacher, "bert") else ""
    for k, v in src.items():
        rest = k[len(prefix):] if k.startswith(prefix) else None
        if rest is not None and rest.startswith("encoder.layer."):
            i = int(rest.split(".")[2])
            if i in layers:
                tail = rest.split(".", 3)[3]
                dst[f"{prefix}encoder.layer.{layers.index(i)}.{tail}"] = v
        else:
            dst[k] = v
    load_state(student, dst, base_prefix=prefix, optional=())
    student.to(device=next(teacher.parameters()).device, dtype=next(teacher.parameters()).dtype)
    student.config.name_or_path = getattr(teacher, "name_or_path", None) or ""
    return student.train()


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """Raise ValueError when the student cannot be distilled from this teacher: a different vocabulary, more
    layers than the teacher (no layer mapping exists) or a wider hidden size than the teacher's layers."""
    t, s = body(teacher).config, body(student).config
    if s.vocab_size != t.vocab_size:
        raise ValueError(f"student vocabulary ({s.vocab_size}) differs from the teacher's ({t.vocab_size}); "
                         "teacher and student must share a tokenizer")
    if s.num_hidden_layers > t.num_hidden_layers:
        raise ValueError(f"the student has {s.num_hidden_layers} layers, more than the teacher's "
                         f"{t.num_hidden_layers}")
    if s.hidden_size > t.hidden_size:
        raise ValueError(f"the student is wider than its teacher's layers: hidden size {s.hidden_size} > "
                         f"{t.hidden_size}")
    if s.max_position_embeddings < t.max_position_embeddings:
        log.warning("student max_position_embeddings %d < teacher's %d: keep --max-length within it",
                    s.max_position_embeddings, t.max_position_embeddings)


@dataclass
class Side:
    """One model's outputs on a packed batch (student: with graph; teacher: inference tensors, which
    fastdistil.losses accepts as targets without a copy)."""
    hidden: dict = field(default_factory=dict)   # hidden-state number (0 = embeddings) -> (T, d)
    qkv: dict = field(default_factory=dict)      # attention layer number (1-based) -> {"q","k","v"} (T, H, D)
    last: torch.Tensor | None = None             # (T, d)
    cls: torch.Tensor | None = None              # (B, d) [CLS] rows of the last layer
    mean: torch.Tensor | None = None             # (B, d) mean over each sequence's tokens
    logits: torch.Tensor | None = None           # (B, C) classifier, or (M, V) MLM logits at batch.extra["mlm_pos"]


@dataclass
class Needs:
    """What the objectives read from one side."""
    hidden: set = field(default_factory=set)  # normalised hidden-state numbers
    qkv: set = field(default_factory=set)     # normalised attention layer numbers (1-based)
    cls: bool = False
    mean: bool = False
    logits: bool = False

    def __or__(self, o: "Needs") -> "Needs":
        return Needs(self.hidden | o.hidden, self.qkv | o.qkv, self.cls or o.cls, self.mean or o.mean,
                     self.logits or o.logits)


def side_to(side: Side, dtype) -> Side:
    """The side with every floating tensor in `dtype` (a bf16 teacher's targets for an fp32 student)."""
    c = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    return Side({k: c(v) for k, v in side.hidden.items()}, {k: {n: c(t) for n, t in d.items()}
                                                            for k, d in side.qkv.items()},
                c(side.last), c(side.cls), c(side.mean), c(side.logits))


def _positions(enc: FastStudent, batch) -> torch.Tensor:
    """The batch's packed positions (0-based within each sequence) as the model's position ids: RoBERTa's count from
    padding_idx + 1 (fastdistil/arch/roberta.py); a packed batch holds no pad tokens, so that is all it takes."""
    off = enc.config.position_offset
    return batch.position_ids if not off else batch.position_ids + off


def _depth(needs: "Needs", n: int) -> tuple[int, bool]:
    """How deep a forward must go for `needs`: (layers to run, whether the deepest one runs in full). Pooled,
    [CLS] and logits need the whole encoder; otherwise the run stops at the deepest hidden state read, or right
    after the q/k/v projection of the deepest attention layer read (its attention, output and FFN are skipped)."""
    if needs.cls or needs.mean or needs.logits:
        return n, True
    dh, dq = max(needs.hidden, default=0), max(needs.qkv, default=0)
    return max(dh, dq), dh >= dq


def forward_side(model: nn.Module, batch, needs: Needs) -> Side:
    """Run `model` on a packed batch and collect what `needs` asks for (no padded tensor is ever built), running
    only as deep as needed (MiniLM's teacher stops after the q/k/v projection of the layer it transfers)."""
    enc = body(model)
    n = enc.config.num_hidden_layers
    p = batch.packing
    depth, full = _depth(needs, n)
    positions = _positions(enc, batch)  # (T,)
    side = Side()
    if depth == n and full:
        taps = tuple(sorted({i - 1 for i in needs.qkv} | {i - 1 for i in needs.hidden if i > 0}))
        want_emb = 0 in needs.hidden
        if want_emb and torch.is_grad_enabled():
            x, hidden = enc.forward_packed(batch.ids, batch.token_type_ids, positions, p,
                                           output_hidden_states=True, taps=taps)
            emb = hidden[0]
        else:
            x, _ = enc.forward_packed(batch.ids, batch.token_type_ids, positions, p, taps=taps)
            emb = enc.embeddings(batch.ids, batch.token_type_ids, positions) if want_emb else None
        side.last = x
        for i in needs.hidden:
            side.hidden[i] = emb if i == 0 else (x if i == n else enc.tapped[i - 1]["hidden"])
        for i in needs.qkv:
            t = enc.tapped[i - 1]
            side.qkv[i] = {"q": t["q"], "k": t["k"], "v": t["v"]}
        enc.tapped = {}
    else:
        x = enc.embeddings(batch.ids, batch.token_type_ids, positions)  # (T, d)
        if 0 in needs.hidden:
            side.hidden[0] = x
        for i, layer in enumerate(enc.layers[:depth], start=1):
            if i == depth and not full:  # only this layer's q, k, v are read
                q, k, v = layer.qkv(x)  # (T, H, D) each
                side.qkv[i] = {"q": q, "k": k, "v": v}
                break
            tap = {} if i in needs.qkv else None
            x = layer(x, p, tap)  # (T, d)
            if tap is not None:
                side.qkv[i] = {"q": tap["q"], "k": tap["k"], "v": tap["v"]}
            if i in needs.hidden:
                side.hidden[i] = x
        return side
    x = side.last
    cls_rows = None
    if needs.cls or needs.logits:
        cls_rows = x.index_select(0, p.cu_seqlens[:-1].to(torch.int64))  # (B, d)
        side.cls = cls_rows
    if needs.mean:
        side.mean = mean_pool(x, cu_seqlens=p.cu_seqlens)
    if needs.logits:
        if isinstance(model, FastStudentForSequenceClassification):
            side.logits = model.classify(cls_rows)  # (B, C), through the architecture's classifier
        elif isinstance(model, FastStudentForMaskedLM):
            pos = batch.extra.get("mlm_pos")
            if pos is None:
                raise ValueError("MLM logits need batch.extra['mlm_pos'] (the masked token positions)")
            side.logits = model.mlm_logits(x.index_select(0, pos))  # (M, V)
        else:
            raise ValueError(f"{type(model).__name__} has no head, so it has no logits: use a teacher with a "
                             "classification (BertForSequenceClassification) or MLM (BertForMaskedLM) head")
    return side


def has_logits(model) -> bool:
    return isinstance(model, (FastStudentForSequenceClassification, FastStudentForMaskedLM))


def normalise_layer(i: int, n: int, *, hidden: bool) -> int:
    """Map a possibly negative layer number onto 0..n (hidden) or 1..n (attention), or raise ValueError."""
    lo = 0 if hidden else 1
    j = n + 1 + i if i < 0 else i
    if not lo <= j <= n:
        kind = "hidden state" if hidden else "attention layer"
        raise ValueError(f"{kind} {i} does not exist in a {n}-layer model (valid: {lo}..{n} or negatives)")
    return j
