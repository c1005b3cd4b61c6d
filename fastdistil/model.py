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
from .config import FastStudentConfig
from .outputs import ModelOutput
from .padding import Packing, gather, pad, unpad


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
        x = ops.embed_layer_norm(ids, token_type_ids, position_ids, self.word_embeddings.weight,
                                 self.position_embeddings.weight, self.token_type_embeddings.weight,
                                 self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
                                 padding_idx=self.word_embeddings.padding_idx)
        return F.dropout(x, self.dropout_p, self.training)


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
        self._qkv_cache = None

    def qkv_weight(self):
        """W_qkv (3d, d) and b_qkv (3d,): one GEMM for the three projections. Concatenated per call while
        training; cached (keyed on the parameters' versions) when no gradient is needed."""
        s = self.attention["self"]
        ps = (s["query"].weight, s["key"].weight, s["value"].weight, s["query"].bias, s["key"].bias, s["value"].bias)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in ps)):
            return torch.cat(ps[:3]), torch.cat(ps[3:])
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in ps)
        if self._qkv_cache is None or self._qkv_cache[0] != key:
            with torch.no_grad():
                self._qkv_cache = (key, torch.cat(ps[:3]), torch.cat(ps[3:]))
        return self._qkv_cache[1], self._qkv_cache[2]

    def forward(self, x, p: Packing, tap: dict | None = None):  # x (T, d)
        if tap is None and not self.training and not torch.is_grad_enabled():  # inference: a backend may run
            return ops.dispatch.lookup("encoder_layer", x.device)(self, x, p)  # the whole layer in one call
        return self.forward_ops(x, p, tap)

    def forward_ops(self, x, p: Packing, tap: dict | None = None):  # x (T, d): the layer as a sequence of ops
        T, d = x.shape
        H, D = self.n_head, self.head_dim
        drop = self.training
        w, b = self.qkv_weight()
        qkv = F.linear(x, w, b).view(T, 3, H, D)  # (T, 3, H, D)
        q, k, v = qkv.unbind(1)  # (T, H, D) each
        if tap is not None:
            tap.update(q=q, k=k, v=v)
        ctx = ops.varlen_attention(q, k, v, p.cu_seqlens, p.max_seqlen,
                                   dropout_p=self.attn_dropout if drop else 0.0)  # (T, H, D)
        o, f = self.attention["output"], self.output
        p_drop = self.hidden_dropout if drop else 0.0
        x = ops.linear_layer_norm(ctx.reshape(T, d), o["dense"].weight, o["dense"].bias, x, o["LayerNorm"].weight,
                                  o["LayerNorm"].bias, o["LayerNorm"].eps, dropout_p=p_drop)  # (T, d)
        h = ops.linear_gelu(x, self.intermediate["dense"].weight, self.intermediate["dense"].bias,
                            approximate=self.gelu_approximate)  # (T, f)
        x = ops.linear_layer_norm(h, f["dense"].weight, f["dense"].bias, x, f["LayerNorm"].weight, f["LayerNorm"].bias,
                                  f["LayerNorm"].eps, dropout_p=p_drop)  # (T, d)
        return x


ops.dispatch.register("encoder_layer", "torch")(lambda layer, x, p: layer.forward_ops(x, p))


class Pooler(nn.Module):
    def __init__(self, cfg: FastStudentConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, cls):  # (B, d) -> (B, d)
        return torch.tanh(self.dense(cls))


class FastStudent(nn.Module):
    """BERT encoder on fastdistil's ops. Same forward signature, outputs and state-dict keys as
    transformers.BertModel; `from_pretrained` / `save_pretrained` / `from_hf` / `to_hf` live in loading.py."""

    def __init__(self, config: FastStudentConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = _node(layer=nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers)))
        self.pooler = Pooler(config) if add_pooling_layer else None
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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False, return_dict: bool = True, **unused):
        """Same arguments and outputs as transformers.BertModel.forward.

        Args:
            input_ids: (B, L) integer token ids.
            attention_mask: optional (B, L), 1 = real token. Padded positions of the outputs are zeros.
            token_type_ids, position_ids: optional (B, L); default zeros and 0..L-1.
            output_hidden_states: also return embeddings + every layer's output, each (B, L, d).
        Returns:
            ModelOutput with last_hidden_state (B, L, d), pooler_output (B, d) and hidden_states (or None).
        """
        for k in ("head_mask", "encoder_hidden_states", "past_key_values", "inputs_embeds"):
            if unused.get(k) is not None:
                raise ValueError(f"FastStudent does not support {k}")
        if unused.get("output_attentions"):
            raise ValueError("FastStudent never materialises attention probabilities (output_attentions); "
                             "distillation objectives use the q/k/v taps of forward_packed instead")
        ids, tt, pos, p = self.prepare(input_ids, attention_mask, token_type_ids, position_ids)
        x, hidden = self.forward_packed(ids, tt, pos, p, output_hidden_states=output_hidden_states)
        last = pad(x, p)  # (B, L, d)
        pooled = self.pooler(last[:, 0]) if self.pooler is not None else None
        hs = tuple(pad(h, p) for h in hidden) if output_hidden_states else None
        out = ModelOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hs)
        return out if return_dict else out.to_tuple()

    def prepare(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """Check the inputs (one host sync for all value checks) and pack them: (ids, tt, pos) (T,) + Packing."""
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if L > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        dev = self.device
        input_ids = input_ids.to(dev)
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
            if t is not None and tuple(t.shape) != (B, L):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, L)} like input_ids")
            if t is not None and name != "attention_mask" and (t.dtype.is_floating_point or t.dtype == torch.bool):
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.to(dev)
        pos = (torch.arange(L, device=dev).expand(B, L) if position_ids is None else position_ids.to(dev))
        if input_ids.numel() and not torch.compiler.is_compiling():  # value checks sync; skipped when traced
            bad = torch.stack([(input_ids < 0).any(), (input_ids >= cfg.vocab_size).any(), (tt < 0).any(),
                               (tt >= cfg.type_vocab_size).any(), (pos < 0).any(),
                               (pos >= cfg.max_position_embeddings).any()]).tolist()
            if bad[0] or bad[1]:
                raise ValueError(f"input_ids must lie in [0, vocab_size={cfg.vocab_size}); got values in "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")
            if bad[2] or bad[3]:
                raise ValueError(f"token_type_ids must lie in [0, type_vocab_size={cfg.type_vocab_size}); got "
                                 f"values in [{int(tt.min())}, {int(tt.max())}]")
            if bad[4] or bad[5]:
                raise ValueError(f"position_ids must lie in [0, max_position_embeddings="
                                 f"{cfg.max_position_embeddings})")
        p = unpad(None if attention_mask is None else attention_mask.to(dev), B, L, dev)
        return gather(input_ids, p), gather(tt, p), gather(pos, p), p

    def forward_packed(self, ids, tt, pos, p: Packing, output_hidden_states: bool = False, taps=()):
        """The padding-free core: (T,) ids -> (T, d). Returns (x, hidden) where hidden lists the embeddings and
        every layer's output when output_hidden_states. `taps` names layer indices whose q, k, v (T, H, D) are
        recorded into `self.tapped[i]` for distillation (probabilities are never materialised)."""
        x = self.embeddings(ids, tt, pos)  # (T, d)
        hidden = [x] if output_hidden_states else []
        self.tapped = {}
        for i, layer in enumerate(self.layers):
            tap = self.tapped.setdefault(i, {}) if i in taps else None
            x = layer(x, p, tap)
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
