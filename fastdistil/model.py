"""FastStudent: a BERT encoder on fastdistil's fused ops, padding-free, drop-in for transformers.BertModel.

Read top to bottom: embeddings -> N x Layer -> pooler. Inputs are unpadded once (fastdistil/padding.py);
every layer runs on (T, d) real tokens; outputs are padded back once. Parameter names equal transformers'
state-dict keys, so checkpoints load and save without renaming.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from . import ops
from .arch.distilbert import sinusoidal
from .arch.roberta import position_ids as offset_positions
from .backend import resolve
from .config import FastStudentConfig
from .hf_surface import PreTrainedSurface
from .inputs import check_hf_kwargs, check_host, check_inputs, is_host
from .leftpad import LeftPad
from .outputs import ModelOutput
from .ops.checks import trusted_packing
from .ops import rng
from .padding import Packing, gather, pack_host, pad, unpack_static, unpad
from .layer_weights import LayerList, LayerWeights, activation_name, attend, layer_ops
from .weight_cache import fused_qkv, owned


def _node(**children) -> nn.ModuleDict:
    """A named container so state-dict keys read like transformers' (attention.self.query.weight)."""
    return nn.ModuleDict(children)


class Embeddings(nn.Module):
    """word + position (+ token type) -> LayerNorm, in the variant of cfg's architecture (fastdistil/arch/):
    DistilBERT has no token-type table; RoBERTa counts default positions from padding_idx + 1 (see positions)."""

    def __init__(self, cfg: FastStudentConfig):
        super().__init__()
        d = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d,
                                                padding_idx=cfg.pad_token_id if cfg.position_offset else None)
        if cfg.token_types:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        else:  # one zero row, not a parameter: the fused op's type gather then adds exactly 0
            self.token_type_embeddings = None
            self.register_buffer("no_types", torch.zeros(1, d), persistent=False)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout_p = cfg.hidden_dropout_prob
        self.position_offset = cfg.position_offset
        self.sinusoidal = cfg.sinusoidal_positions

    def positions(self, input_ids, position_ids):
        """position_ids as given, or the architecture's default computed from (B, L) input_ids where it is not
        0..L-1 (RoBERTa: see arch/roberta.position_ids); None means 0..L-1 (fastdistil/inputs.py)."""
        if position_ids is not None or self.position_offset is None or not isinstance(input_ids, torch.Tensor) \
                or input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            return position_ids  # bad ids are refused by check_inputs, by name
        return offset_positions(input_ids, self.position_offset - 1)

    def forward(self, ids, token_type_ids, position_ids):  # each (T,) -> (T, d)
        word, types = self.word_embeddings, self.token_type_embeddings
        type_weight = self.no_types if types is None else types.weight
        if types is None:
            token_type_ids = torch.zeros_like(ids)
        if type(word) is nn.Embedding and not (word._forward_hooks or word._forward_pre_hooks):
            x = ops.embed_layer_norm(ids, token_type_ids, position_ids, word.weight,
                                     self.position_embeddings.weight, type_weight,
                                     self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                                     padding_idx=word.padding_idx,
                                     position_padding_idx=self.position_embeddings.padding_idx)
        else:  # set_input_embeddings' module, or hooks on it (PEFT, NEFTune, enable_input_require_grads): call it
            x = word(ids) if types is None else word(ids) + types(token_type_ids)
            x = x + self.position_embeddings(position_ids)
            x = ops.layer_norm(x, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)  # (T, d)
        return F.dropout(x, self.dropout_p, True) if self.training else x  # eval: not even a dispatcher call


def _plain(lin: nn.Module) -> bool:
    """A bare nn.Linear with a bias and no hooks: its weight and bias may go straight into a fused op. Anything else
    (a PEFT LoRA wrapper, a hooked or quantised linear) is called as a module, so what it adds takes effect."""
    return type(lin) is nn.Linear and lin.bias is not None and not (lin._forward_hooks or lin._forward_pre_hooks)


def _weight_bias(lin: nn.Module):
    """(weight, bias) of a plain linear (see _plain), else None; read from its parameter dict (no __getattr__)."""
    if type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks:
        return None
    ps = lin._parameters
    w, b = ps.get("weight"), ps.get("bias")
    if w is None or b is None:  # reassigned outside the parameter dict, or no bias: ask the module
        w, b = lin.weight, lin.bias
    return None if b is None else (w, b)


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
        self.attn_out_dropout = None if cfg.arch.attn_output_dropout else 0.0  # DistilBERT: none after out_lin
        self.gelu_approximate = cfg.gelu_approximate

    def dropout_sites(self) -> int:
        """Dropout seeds one training forward of this layer draws (attention, after o_proj, after the FFN)."""
        o_drop = self.hidden_dropout if self.attn_out_dropout is None else self.attn_out_dropout
        return (self.attn_dropout > 0) + (o_drop > 0) + (self.hidden_dropout > 0)

    def _qkv(self):
        """W_qkv (3d, d) and b_qkv (3d,) when query, key and value are plain linears, else None. Concatenated per
        call while training; cached when no gradient is needed (fastdistil/weight_cache.py, not on the module)."""
        s = self.attention["self"]
        q, k, v = _weight_bias(s["query"]), _weight_bias(s["key"]), _weight_bias(s["value"])
        if q is None or k is None or v is None:
            return None
        return fused_qkv((q[0], k[0], v[0], q[1], k[1], v[1]))

    def weight_sources(self):
        """(tensors, settings) that weights() reads, walked through the module dicts directly, or None when some
        projection is not a bare nn.Linear with its weight and bias as parameters (weights() then decides)."""
        a, f = self._modules["attention"]._modules, self._modules["output"]._modules
        s, o = a["self"]._modules, a["output"]._modules
        ts = []
        for lin in (s["query"], s["key"], s["value"], o["dense"], self._modules["intermediate"]._modules["dense"],
                    f["dense"]):
            w, b = lin._parameters.get("weight"), lin._parameters.get("bias")
            if type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks or w is None or b is None:
                return None
            ts += (w, b)
        ln1, ln2 = o["LayerNorm"], f["LayerNorm"]
        ts += (ln1.weight, ln1.bias, ln2.weight, ln2.bias)
        return ts, (ln1.eps, ln2.eps, self.n_head, self.gelu_approximate, self.attn_dropout, self.hidden_dropout,
                    self.attn_out_dropout)

    def weights(self) -> LayerWeights | None:
        """This layer as a LayerWeights (fastdistil/layer_weights.py), or None when a projection is not a bare
        nn.Linear (PEFT LoRA, quantised, hooked: see _plain); the module path then runs so that it takes effect.
        Built per call (inference calls it once per layer and forward: it reads the parameter dicts directly)."""
        o, f = self.attention["output"], self.output
        wo, wi, wf = _weight_bias(o["dense"]), _weight_bias(self.intermediate["dense"]), _weight_bias(f["dense"])
        qkv = None if wo is None or wi is None or wf is None else self._qkv()
        if qkv is None:
            return None
        ln1, ln2 = o["LayerNorm"], f["LayerNorm"]
        return LayerWeights(*qkv, *wo, ln1.weight, ln1.bias, *wi, *wf, ln2.weight, ln2.bias, ln1.eps, ln2.eps,
                            self.n_head, activation_name(self.gelu_approximate), "post", self.attn_dropout,
                            self.hidden_dropout, self.attn_out_dropout)

    def qkv(self, x):
        """q, k, v (N, H, D) of rows x (N, d): one GEMM when the three projections are plain."""
        s, qkv = self.attention["self"], self._qkv()
        if qkv is not None:
            return F.linear(x, *qkv).view(-1, 3, self.n_head, self.head_dim).unbind(1)
        return tuple(s[n](x).view(-1, self.n_head, self.head_dim) for n in ("query", "key", "value"))

    def kv(self, x):
        """k, v (N, H, D) of rows x (N, d) (the keys of leftpad's side rows)."""
        s, d = self.attention["self"], x.shape[-1]
        qkv = self._qkv()
        if qkv is not None:
            w, b = qkv
            return F.linear(x, w[d:], b[d:]).view(-1, 2, self.n_head, self.head_dim).unbind(1)
        return tuple(s[n](x).view(-1, self.n_head, self.head_dim) for n in ("key", "value"))

    def forward(self, x, p: Packing, tap: dict | None = None):  # x (T, d)
        if tap is None and not self.training and not torch.is_grad_enabled():
            w = self.weights()
            if w is not None:  # a backend may run the whole layer in one call
                return ops.dispatch.lookup("encoder_layer", x.device)(w, x, p)
        return self.forward_ops(x, p, tap)

    def forward_ops(self, x, p: Packing, tap: dict | None = None):  # x (T, d): the layer as a sequence of ops
        w = self.weights()
        if w is not None:  # the plain layer: written once, in layer_weights.layer_ops
            return layer_ops(w, x, p, training=self.training, tap=tap)
        T, d = x.shape  # adapters (PEFT LoRA) or hooks on a projection: call the modules where they are
        drop = self.training
        q, k, v = self.qkv(x)  # (T, H, D) each
        if tap is not None:
            tap.update(q=q, k=k, v=v)
        a_drop = self.attn_dropout if drop else 0.0
        ctx = attend(q, k, v, p, a_drop)  # (T, H, D)
        o, f = self.attention["output"], self.output
        p_drop = self.hidden_dropout if drop else 0.0
        o_drop = p_drop if self.attn_out_dropout is None or not drop else self.attn_out_dropout
        x = _dense_layer_norm(o, ctx.reshape(T, d), x, o_drop)  # (T, d)
        i = self.intermediate["dense"]
        h = (ops.linear_gelu(x, i.weight, i.bias, approximate=self.gelu_approximate) if _plain(i)
             else F.gelu(i(x), approximate=self.gelu_approximate))  # (T, f)
        return _dense_layer_norm(f, h, x, p_drop)  # (T, d)


def _seeded(layer, seeds, x, p, tap):
    """layer(x, p, tap) with its dropout seeds fixed (None: each op draws), for checkpointed recomputation."""
    with rng.use_seeds(seeds):
        return layer(x, p, tap)


class Pooler(nn.Module):
    def __init__(self, cfg: FastStudentConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, cls):  # (B, d) -> (B, d)
        if _plain(self.dense):  # one launch on the triton backend (ops/pooler.py)
            return ops.linear_tanh(cls, self.dense.weight, self.dense.bias)
        return torch.tanh(self.dense(cls))


class FastStudent(PreTrainedSurface, nn.Module):
    """BERT encoder on fastdistil's ops. Same forward signature, outputs and state-dict keys as
    transformers.BertModel; `from_pretrained` / `save_pretrained` / `from_hf` / `to_hf` live in loading.py."""

    def __init__(self, config: FastStudentConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = _node(layer=nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers)))
        self.pooler = Pooler(config) if add_pooling_layer and config.arch.pooler else None  # DistilBERT: none
        self.gradient_checkpointing, self._checkpoint = False, None  # see gradient_checkpointing_enable
        self.first_token = False  # a head reads transformers' position-0 row (output.first_token) without the pooler
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
        if isinstance(m, Embeddings) and m.sinusoidal:  # after its tables (apply visits children first)
            with torch.no_grad():
                m.position_embeddings.weight.copy_(sinusoidal(*m.position_embeddings.weight.shape))

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
                output_hidden_states: bool | None = False, return_dict: bool | None = True, *,
                check_inputs: bool = True, **hf_kwargs):
        """Same arguments and outputs as transformers.BertModel.forward.

        Args:
            input_ids: (B, L) integer token ids.
            attention_mask: optional (B, L), 1 = real token. Padded positions of the outputs are zeros.
            token_type_ids, position_ids: optional (B, L); default zeros and 0..L-1 (RoBERTa: counted from
                padding_idx + 1 over the non-pad ids, as transformers does).
            output_hidden_states: also return embeddings + every layer's output, each (B, L, d).
            check_inputs: check the id ranges and mask values. Host (CPU) inputs are checked on the host for free;
                inputs already on a GPU cost one fused check and one host sync, which False skips (for CUDA
                graphs and torch.compile: out-of-range ids then read outside the tables).
            hf_kwargs: BertModel.forward's other keywords, accepted where harmless (use_cache, head_mask=None,
                output_attentions=False, ...) and refused by name otherwise; any other keyword is a TypeError.
        Returns:
            ModelOutput with last_hidden_state (B, L, d), pooler_output (B, d) and hidden_states (or None).
        """
        check_hf_kwargs(hf_kwargs)
        out = self._forward(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                            check_inputs)
        return out if return_dict or return_dict is None else out.to_tuple()

    def _forward(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states=False,
                 check: bool = True, lead: bool | None = None, static: bool = False) -> ModelOutput:
        """forward's body. `lead`: whether some row starts with padding, when the caller knows; `static`: the
        capacity layout even for host tensors (GraphRunner: what it captures on a GPU, it runs so on the CPU)."""
        position_ids = self.embeddings.positions(input_ids, position_ids)  # the architecture's default
        ids, tt, pos, p, known = self._prepare(input_ids, attention_mask, token_type_ids, position_ids, check,
                                               static)
        lead = known if lead is None else lead
        with trusted_packing():  # the model's own cu_seqlens: no per-layer value checks (ops/checks.py)
            side = (self._left_padded(input_ids, attention_mask, token_type_ids, position_ids, p, lead)
                    if self.pooler is not None or self.first_token else None)  # position 0 as transformers has it
            x, hidden = self.forward_packed(ids, tt, pos, p, output_hidden_states=output_hidden_states, side=side)
        last = pad(x, p)  # (B, L, d)
        cls = last[:, 0] if side is None else side.first(last[:, 0])  # (B, d): transformers' [CLS] values
        pooled = self.pooler(cls) if self.pooler is not None else None
        hs = tuple(pad(h, p) for h in hidden) if output_hidden_states else None
        out = ModelOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hs)
        out.__dict__["first_token"] = cls  # not a field: heads read it (padding at position 0 computed when asked)
        return out

    def cuda_graphs(self, **kw):
        """A fastdistil.GraphRunner of this model: CUDA-graph replay of the inference forward and of encode, one
        graph per (batch, length) bucket (see fastdistil/graphs.py for the buckets and their memory)."""
        from .graphs import GraphRunner
        return GraphRunner(self, **kw)

    def prepare(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """Check the inputs and pack them, exact layout: (ids, tt, pos) (T,) + Packing (fastdistil/inputs.py,
        padding.py). Host inputs cost no sync; device inputs with a mask one (pass host tensors)."""
        position_ids = self.embeddings.positions(input_ids, position_ids)  # the architecture's default
        return self._prepare(input_ids, attention_mask, token_type_ids, position_ids, exact=True)[:4]

    def _prepare(self, input_ids, attention_mask, token_type_ids, position_ids, check: bool = True,
                 static: bool = False, exact: bool = False):
        """(ids, tt, pos, Packing, lead) where lead says whether some row starts with padding (None: unknown).

        Host inputs (tokenizer output): checked and packed on the host, one copy to the device, no sync.
        Device inputs: exact packing (one sync) while autograd records; otherwise, and under torch.compile, the
        capacity layout (padding.unpad_static): no sync, static shapes."""
        if not static and is_host(input_ids, attention_mask, token_type_ids, position_ids):
            ids, mask, tt, pos = check_host(self.config, input_ids, attention_mask, token_type_ids, position_ids,
                                            values=check)  # numpy (B, L) each
            lead = None if mask is None else bool((~mask[:, 0]).any())
            return (*pack_host(ids, mask, tt, pos, self.device), lead)
        ids, mask, tt, pos, lead = check_inputs(self.config, input_ids, attention_mask, token_type_ids,
                                                position_ids, self.device, values=check, defaults=False,
                                                want_lead=True)  # (B, L) each or None; lead read with the checks
        B, L = ids.shape
        if mask is not None and not exact and not torch.is_grad_enabled():  # (capacity rows: no gradients)
            return (*unpack_static(ids, mask, tt, pos), lead)  # one launch on the triton backend
        tt = torch.zeros_like(ids) if tt is None else tt
        pos = torch.arange(L, device=ids.device).expand(B, L) if pos is None else pos
        p = unpad(mask, B, L, ids.device)  # no mask: no sync; else exact layout, one sync (autograd records)
        return gather(ids, p), gather(tt, p), gather(pos, p), p, lead

    def _left_padded(self, input_ids, attention_mask, token_type_ids, position_ids, p: Packing, lead=None):
        """The rows whose position 0 is padding, as query-only side rows (None when there are none). The pooler
        reads position 0, where transformers computes a value from the pad token (fastdistil/leftpad.py);
        last_hidden_state keeps zeros there."""
        side = LeftPad.build(attention_mask, p, lead)
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
            if i % every == 0:  # the layer's seeds are taken now: its recompute makes the same dropout masks
                run = functools.partial(_seeded, layer, rng.take(layer.dropout_sites() if layer.training else 0))
                if offload and x.device.type != "cpu":  # saved tensors wait in pinned host memory
                    with torch.autograd.graph.save_on_cpu(pin_memory=True):
                        return fn(run, x, p, tap)
                return fn(run, x, p, tap)
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

    def _encoder_weights(self, x) -> list[LayerWeights] | None:
        """Every layer's LayerWeights when the whole inference encoder may run as one ``encoder`` op: eval mode, no
        autograd, a backend that implements it, and every layer a plain, hook-free Layer (else None: per layer)."""
        if torch.is_grad_enabled() or not ops.dispatch.implemented("encoder", resolve(x.device)):
            return None
        if _global_forward_hooks or _global_forward_pre_hooks:
            return None
        sources, settings, traced = [], [], torch.compiler.is_compiling()
        for layer in self.layers:
            if (layer.training or type(layer).forward is not Layer.forward or layer._forward_hooks
                    or layer._forward_pre_hooks):
                return None
            got = None if traced else layer.weight_sources()  # traced: no cache
            if got is None:
                return self._layer_weights()
            sources += got[0]
            settings.append(got[1])
        return owned(self, "encoder", sources, tuple(settings), self._layer_weights)  # one walk, no rebuild

    def _layer_weights(self) -> list[LayerWeights] | None:
        ws = LayerList(layer.weights() for layer in self.layers)
        return None if any(w is None for w in ws) else ws

    def forward_packed(self, ids, tt, pos, p: Packing, output_hidden_states: bool = False, taps=(),
                       side: LeftPad | None = None):
        """The padding-free core: (T,) ids -> (T, d). Returns (x, hidden) where hidden lists the embeddings and
        every layer's output when output_hidden_states. `taps` names layer indices whose q, k, v (T, H, D) are
        recorded into `self.tapped[i]` for distillation (probabilities are never materialised)."""
        x = self.embeddings(ids, tt, pos)  # (T, d)
        hidden = [x] if output_hidden_states else []
        self.tapped = {}
        ws = None if taps or side is not None or output_hidden_states else self._encoder_weights(x)
        if ws is not None:  # inference: every layer in one op (native: one C++ call)
            return ops.dispatch.lookup("encoder", x.device)(ws, x, p), hidden
        with rng.seed_pool(self._dropout_sites(x, side), x.device):  # the forward's dropout seeds: one draw
            return self._layers(x, p, hidden, output_hidden_states, taps, side)

    def _dropout_sites(self, x, side) -> int:
        """Seeds this training forward takes (a layer's three, twice with side rows) when its backend's kernels
        take seeds (triton, native; the torch backend's dropout draws its own masks). 0 under torch.compile."""
        if torch.compiler.is_compiling() or resolve(x.device) == "torch":
            return 0
        n = sum(layer.dropout_sites() for layer in self.layers if layer.training)
        return n if side is None else 2 * n

    def _layers(self, x, p, hidden, output_hidden_states, taps, side):
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
        """Convert a transformers BertModel, DistilBertModel, RobertaModel or XLMRobertaModel (or a head holding
        one) in memory (fastdistil/arch/)."""
        from .loading import from_hf
        return from_hf(cls, bert_model)

    def to_hf(self):
        """Return an equivalent transformers.BertModel holding copies of these weights."""
        from .loading import to_hf
        return to_hf(self)

    def quantize(self, mode: str = "int8", *, calibration=None, min_cosine: float = 0.998, **kw):
        """int8 GEMMs for CPU inference, in place, with a measured accuracy bound (fastdistil/quantize.py).
        Returns self; `self.quantization` reports the GEMMs kept fp32 and the worst-sequence cosine reached."""
        from .quantize import quantize
        return quantize(self, mode, calibration=calibration, min_cosine=min_cosine, **kw)

    def encode(self, texts, tokenizer=None, *, batch_size: int = 64, normalize: bool = True, max_length=None,
               show_progress: bool = False):
        """Sentence embeddings by mean pooling over real tokens (sentence-transformers' recipe), sorted by
        length internally to minimise padding. Returns a float32 (N, d) tensor in the input order."""
        from .embed import encode
        return encode(self, texts, tokenizer=tokenizer, batch_size=batch_size, normalize=normalize,
                      max_length=max_length, show_progress=show_progress)
