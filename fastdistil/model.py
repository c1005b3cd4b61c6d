"""FastStudent: a BERT encoder on fastdistil's fused ops, padding-free, drop-in for transformers.BertModel.

Read top to bottom: embeddings -> N x Layer -> pooler. Inputs are unpadded once (fastdistil/padding.py);
every layer runs on (T, d) real tokens; outputs are padded back once. Parameter names equal transformers'
state-dict keys, so checkpoints load and save without renaming.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .backend import resolve
from .config import FastStudentConfig
from .hf_surface import PreTrainedSurface
from .inputs import check_hf_kwargs, check_inputs
from .leftpad import LeftPad
from .outputs import ModelOutput
from .padding import Packing, gather, pad, unpad
from .weight_cache import fused_qkv


def _node(**children) -> nn.ModuleDict:
    """A named container so state-dict keys read like transformers' (attention.self.query.weight)."""
    return nn.ModuleDict(children)


class Embeddings(nn.Module):
    def __init__(self, cfg: FastStudentConfig):
        super().__init__()
        d = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout_p = cfg.hidden_dropout_prob

    def forward(self, ids, token_type_ids, position_ids):  # each (T,) -> (T, d)
        word = self.word_embeddings
        if type(word) is nn.Embedding and not (word._forward_hooks or word._forward_pre_hooks):
            x = ops.embed_layer_norm(ids, token_type_ids, position_ids, word.weight,
                                     self.position_embeddings.weight, self.token_type_embeddings.weight,
                                     self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                                     padding_idx=word.padding_idx)
        else:  # set_input_embeddings' module, or hooks on it (PEFT, NEFTune, enable_input_require_grads): call it
            x = word(ids) + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
            x = ops.layer_norm(x, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)  # (T, d)
        return F.dropout(x, self.dropout_p, self.training)


def _plain(lin: nn.Module) -> bool:
    """A bare nn.Linear with a bias and no hooks: its weight and bias may go straight into a fused op. Anything else
    (a PEFT LoRA wrapper, a hooked or quantised linear) is called as a module, so what it adds takes effect."""
    return type(lin) is nn.Linear and lin.bias is not None and not (lin._forward_hooks or lin._forward_pre_hooks)


def _dense_layer_norm(block, h, residual, p_drop: float):
    """LayerNorm(dropout(dense(h)) + residual) of an attention-output / output block: one fused op when plain."""
    dense, ln = block["dense"], block["LayerNorm"]
    if _plain(dense):
        return ops.linear_layer_norm(h, dense.weight, dense.bias, residual, ln.weight, ln.bias, ln.eps,
                                     dropout_p=p_drop)
    return ops.layer_norm(dense(h), ln.weight, ln.bias, ln.eps, residual=residual, dropout_p=p_drop)


class Layer(nn.Module):
    """One post-LayerNorm BERT layer on packed tokens."""

    def __init__(self, cfg: FastStudentConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.attention = _node(self=_node(query=nn.Linear(d, d), key=nn.Linear(d, d), value=nn.Linear(d, d)),
                               output=_node(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d, eps=cfg.layer_norm_eps)))
        self.intermediate = _node(dense=nn.Linear(d, f))
        self.output = _node(dense=nn.Linear(f, d), LayerNorm=nn.LayerNorm(d, eps=cfg.layer_norm_eps))
        self.attn_dropout, self.hidden_dropout = cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob
        self.gelu_approximate = cfg.gelu_approximate

    def qkv_weight(self):
        """W_qkv (3d, d) and b_qkv (3d,): one GEMM for the three projections. Concatenated per call while
        training; cached when no gradient is needed (weight_cache.fused_qkv: not copied or pickled with the model)."""
        s = self.attention["self"]
        return fused_qkv(self, (s["query"].weight, s["key"].weight, s["value"].weight, s["query"].bias,
                                s["key"].bias, s["value"].bias))

    def plain(self) -> bool:
        """Every projection is a bare nn.Linear (see _plain): a backend may then read the weights directly."""
        s = self.attention["self"]
        return all(_plain(m) for m in (s["query"], s["key"], s["value"], self.attention["output"]["dense"],
                                       self.intermediate["dense"], self.output["dense"]))

    def kv(self, x):
        """k, v (N, H, D) of rows x (N, d) (the keys of leftpad's side rows)."""
        s, d = self.attention["self"], x.shape[-1]
        if _plain(s["query"]) and _plain(s["key"]) and _plain(s["value"]):
            w, b = self.qkv_weight()
            return F.linear(x, w[d:], b[d:]).view(-1, 2, self.n_head, self.head_dim).unbind(1)
        return tuple(s[n](x).view(-1, self.n_head, self.head_dim) for n in ("key", "value"))

    def forward(self, x, p: Packing, tap: dict | None = None):  # x (T, d)
        if tap is None and not self.training and not torch.is_grad_enabled() and self.plain():  # a backend may run
            return ops.dispatch.lookup("encoder_layer", x.device)(self, x, p)  # the whole layer in one call
        return self.forward_ops(x, p, tap)

    def forward_ops(self, x, p: Packing, tap: dict | None = None):  # x (T, d): the layer as a sequence of ops
        T, d = x.shape
        H, D = self.n_head, self.head_dim
        drop = self.training
        s = self.attention["self"]
        if _plain(s["query"]) and _plain(s["key"]) and _plain(s["value"]):
            w, b = self.qkv_weight()
            q, k, v = F.linear(x, w, b).view(T, 3, H, D).unbind(1)  # (T, H, D) each
        else:  # adapters (PEFT LoRA) or hooks on a projection: call the modules
            q, k, v = (s[n](x).view(T, H, D) for n in ("query", "key", "value"))
        if tap is not None:
            tap.update(q=q, k=k, v=v)
        a_drop = self.attn_dropout if drop else 0.0
        ctx = (p.attend(q, a_drop) if isinstance(p, LeftPad)  # query-only side rows (fastdistil/leftpad.py)
               else ops.varlen_attention(q, k, v, p.cu_seqlens, p.max_seqlen, dropout_p=a_drop))  # (T, H, D)
        o, f = self.attention["output"], self.output
        p_drop = self.hidden_dropout if drop else 0.0
        x = _dense_layer_norm(o, ctx.reshape(T, d), x, p_drop)  # (T, d)
        i = self.intermediate["dense"]
        h = (ops.linear_gelu(x, i.weight, i.bias, approximate=self.gelu_approximate) if _plain(i)
             else F.gelu(i(x), approximate=self.gelu_approximate))  # (T, f)
        return _dense_layer_norm(f, h, x, p_drop)  # (T, d)


ops.dispatch.register("encoder_layer", "torch")(lambda layer, x, p: layer.forward_ops(x, p))


class Pooler(nn.Module):
    def __init__(self, cfg: FastStudentConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, cls):  # (B, d) -> (B, d)
        return torch.tanh(self.dense(cls))


class FastStudent(PreTrainedSurface, nn.Module):
    """BERT encoder on fastdistil's ops. Same forward signature, outputs and state-dict keys as
    transformers.BertModel; `from_pretrained` / `save_pretrained` / `from_hf` / `to_hf` live in loading.py."""

    def __init__(self, config: FastStudentConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = _node(layer=nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers)))
        self.pooler = Pooler(config) if add_pooling_layer else None
        self.gradient_checkpointing, self._checkpoint = False, None  # see gradient_checkpointing_enable
        self.apply(self._init_weights)

    def _init_weights(self, m):  # BERT's initialisation, for students built from scratch
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder["layer"]

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool | None = False, return_dict: bool | None = True, **hf_kwargs):
        """Same arguments and outputs as transformers.BertModel.forward.

        Args:
            input_ids: (B, L) integer token ids.
            attention_mask: optional (B, L), 1 = real token. Padded positions of the outputs are zeros.
            token_type_ids, position_ids: optional (B, L); default zeros and 0..L-1.
            output_hidden_states: also return embeddings + every layer's output, each (B, L, d).
            hf_kwargs: BertModel.forward's other keywords, accepted where harmless (use_cache, head_mask=None,
                output_attentions=False, ...) and refused by name otherwise; any other keyword is a TypeError.
        Returns:
            ModelOutput with last_hidden_state (B, L, d), pooler_output (B, d) and hidden_states (or None).
        """
        check_hf_kwargs(hf_kwargs)
        ids, tt, pos, p = self.prepare(input_ids, attention_mask, token_type_ids, position_ids)
        side = None if self.pooler is None else self._left_padded(input_ids, attention_mask, token_type_ids,
                                                                   position_ids, p)
        x, hidden = self.forward_packed(ids, tt, pos, p, output_hidden_states=output_hidden_states, side=side)
        last = pad(x, p)  # (B, L, d)
        cls = last[:, 0] if side is None else side.first(last[:, 0])  # (B, d): transformers' [CLS] values
        pooled = self.pooler(cls) if self.pooler is not None else None
        hs = tuple(pad(h, p) for h in hidden) if output_hidden_states else None
        out = ModelOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hs)
        return out if return_dict or return_dict is None else out.to_tuple()

    def prepare(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """Check the inputs (one host sync for all value checks) and pack them: (ids, tt, pos) (T,) + Packing."""
        ids, mask, tt, pos = check_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids,
                                          self.device)  # (B, L) each; fastdistil/inputs.py
        p = unpad(mask, *ids.shape, ids.device)
        return gather(ids, p), gather(tt, p), gather(pos, p), p

    def _left_padded(self, input_ids, attention_mask, token_type_ids, position_ids, p: Packing):
        """The rows whose position 0 is padding, as query-only side rows (None when there are none). The pooler
        reads position 0, where transformers computes a value from the pad token (fastdistil/leftpad.py);
        last_hidden_state keeps zeros there."""
        side = LeftPad.build(attention_mask, p)
        if side is not None:
            r = side.rows

            def first(t):  # (B, L) input (already checked by prepare) -> (E,) int64 at position 0
                return torch.zeros_like(r) if t is None else t[:, 0].to(r.device, torch.int64)[r]
            side.state = self.embeddings(first(input_ids), first(token_type_ids), first(position_ids))  # (E, d)
        return side

    def _run_layer(self, i, layer, x, p, tap):
        """Layer i; checkpointed (activations recomputed in the backward) after gradient_checkpointing_enable."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            fn, every, offload = self._checkpoint
            if i % every == 0:
                if offload and x.device.type != "cpu":  # saved tensors wait in pinned host memory
                    with torch.autograd.graph.save_on_cpu(pin_memory=True):
                        return fn(layer, x, p, tap)
                return fn(layer, x, p, tap)
        return layer(x, p, tap)

    @staticmethod
    def _side_step(layer, side: LeftPad, x, tap):
        """Advance the side rows through `layer`, whose input was x (T, d): keys and values of their rows' real
        tokens from the layer's own q/k/v when it ran per op (tap), else recomputed for those tokens only."""
        if tap and "k" in tap:
            side.keys(tap["k"], tap["v"])
        else:
            side.keys(*layer.kv(x.index_select(0, side.tokens)), packed=False)
        side.state = layer.forward_ops(side.state, side)  # (E, d)

    def forward_packed(self, ids, tt, pos, p: Packing, output_hidden_states: bool = False, taps=(),
                       side: LeftPad | None = None):
        """The padding-free core: (T,) ids -> (T, d). Returns (x, hidden) where hidden lists the embeddings and
        every layer's output when output_hidden_states. `taps` names layer indices whose q, k, v (T, H, D) are
        recorded into `self.tapped[i]` for distillation (probabilities are never materialised)."""
        x = self.embeddings(ids, tt, pos)  # (T, d)
        hidden = [x] if output_hidden_states else []
        self.tapped = {}
        for i, layer in enumerate(self.layers):
            tap = self.tapped.setdefault(i, {}) if i in taps else None
            if side is not None and tap is None and not self.gradient_checkpointing and (
                    layer.training or torch.is_grad_enabled()
                    or not ops.dispatch.implemented("encoder_layer", resolve(x.device))):
                tap = {}  # the layer runs per op anyway: its k, v serve the side rows at no cost
            x_in, x = x, self._run_layer(i, layer, x, p, tap)
            if side is not None:
                self._side_step(layer, side, x_in, tap)
            if tap is not None:
                tap["hidden"] = x
            if output_hidden_states:
                hidden.append(x)
        return x, hidden

    # loading / saving / conversion: see fastdistil/loading.py
    @classmethod
    def from_pretrained(cls, name_or_path, *, dtype=None, device=None, **kw):
        """Load a Hugging Face BERT checkpoint (local directory, sentence-transformers directory, or a hub id in
        the local HF cache). Strict: every key used or reported, every shape checked."""
        from .loading import from_pretrained
        return from_pretrained(cls, name_or_path, dtype=dtype, device=device, **kw)

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors with transformers' key names."""
        from .loading import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_hf(cls, bert_model):
        """Convert a transformers BertModel (or a model holding one as `.bert`) in memory."""
        from .loading import from_hf
        return from_hf(cls, bert_model)

    def to_hf(self):
        """Return an equivalent transformers.BertModel holding copies of these weights."""
        from .loading import to_hf
        return to_hf(self)

    def encode(self, texts, tokenizer=None, *, batch_size: int = 64, normalize: bool = True, max_length=None,
               show_progress: bool = False):
        """Sentence embeddings by mean pooling over real tokens (sentence-transformers' recipe), sorted by
        length internally to minimise padding. Returns a float32 (N, d) tensor in the input order."""
        from .embed import encode
        return encode(self, texts, tokenizer=tokenizer, batch_size=batch_size, normalize=normalize,
                      max_length=max_length, show_progress=show_progress)
