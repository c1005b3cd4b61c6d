"""The model's input checks: one rule for every backend, a clear error at the boundary, never a silent guess.

Where the value checks run (the shape and dtype checks are host metadata and always run):
- `check_host`: the inputs are host (CPU) tensors, the usual case (tokenizer output). Every value check runs on
  the host with numpy, before anything reaches the device: no launch, no device synchronisation. FastStudent then
  packs on the host too (padding.pack_host) and copies once.
- `check_inputs`: the inputs are already on a device. The value checks are one fused reduction (one small tensor
  of flags) and one read of it: the forward's only host synchronisation. `check_inputs=False` (FastStudent.forward)
  skips it; torch.compile skips it while tracing; fastdistil.GraphRunner checks on the host before it copies the
  inputs into its static buffers and then replays with checks off.
`check_hf_kwargs` handles the keyword
arguments of transformers' BertModel.forward that FastStudent has no use for: harmless values are accepted,
others refused by name, and any other keyword is a TypeError, as for any Python function.
"""
from __future__ import annotations

import difflib

import numpy as np
import torch

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64)
MASK_DTYPES = (torch.bool, *INT_DTYPES, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _none(v) -> bool:
    return v is None


def _off(v) -> bool:  # a flag left at its default
    return v is None or v is False


# transformers' BertModel.forward keywords (4.x and 5.x names) beyond FastStudent's own, with the values that
# change nothing for a bidirectional encoder without a cache, and why other values are refused
_HF_KWARGS = {
    "inputs_embeds": (_none, "pass input_ids; it embeds them itself"),
    "head_mask": (_none, "it has no per-head masking"),
    "encoder_hidden_states": (_none, "it has no cross-attention"),
    "encoder_attention_mask": (_none, "it has no cross-attention"),
    "past_key_values": (_none, "an encoder keeps no key/value cache"),
    "cache": (_none, "an encoder keeps no key/value cache"),
    "cache_position": (_none, "an encoder keeps no key/value cache"),
    "use_cache": (lambda v: True, ""),  # transformers ignores it for an encoder too
    "output_attentions": (_off, "it never materialises attention probabilities; distillation objectives use the "
                                "q/k/v taps of forward_packed instead"),
    "output_router_logits": (_off, "it has no router"),
    "is_causal": (_off, "BERT attention is bidirectional"),
    "cu_seq_lens_q": (_none, "it packs sequences itself from attention_mask"),
    "cu_seq_lens_k": (_none, "it packs sequences itself from attention_mask"),
    "max_length_q": (_none, "it packs sequences itself from attention_mask"),
    "max_length_k": (_none, "it packs sequences itself from attention_mask"),
    "seq_idx": (_none, "it packs sequences itself from attention_mask"),
    "num_items_in_batch": (lambda v: True, ""),  # Trainer's loss-normalisation hint; the encoder has no loss
}
_OWN = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "output_hidden_states", "return_dict",
        "check_inputs")


def check_hf_kwargs(kwargs: dict, owner: str = "FastStudent.forward()") -> None:
    """Accept transformers' BertModel.forward keywords whose value changes nothing here; refuse the rest by name.

    Raises:
        TypeError: a keyword BertModel.forward does not take either (e.g. a misspelling such as attn_mask).
        ValueError: a BertModel keyword with a value FastStudent cannot honour (inputs_embeds, a cache, ...).
    """
    for k, v in kwargs.items():
        if k not in _HF_KWARGS:
            near = difflib.get_close_matches(k, _OWN + tuple(_HF_KWARGS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TypeError(f"{owner} got an unexpected keyword argument {k!r}{hint}")
        ok, why = _HF_KWARGS[k]
        if not ok(v):
            raise ValueError(f"FastStudent does not support {k}={_short(v)}: {why}")


def _short(v) -> str:
    return f"<tensor {tuple(v.shape)}>" if isinstance(v, torch.Tensor) else repr(v)[:60]


def _tensor(name: str, t, integer: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} (tokenizers return tensors with "
                        "return_tensors='pt')")
    if integer and t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if not integer and t.dtype not in MASK_DTYPES:
        raise TypeError(f"{name} must be a bool, integer or floating tensor of 0s and 1s, got {t.dtype}")


def _check_meta(cfg, input_ids, attention_mask, token_type_ids, position_ids) -> None:
    """Types, dtypes and shapes: host metadata, no value read."""
    _tensor("input_ids", input_ids, integer=True)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    if L == 0:
        raise ValueError(f"input_ids has shape {(B, L)}: every sequence needs at least one token ([CLS])")
    if L > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {L} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                    ("position_ids", position_ids)):
        if t is not None:
            _tensor(name, t, integer=name != "attention_mask")
            if tuple(t.shape) != (B, L):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, L)} like input_ids")


def is_host(*ts) -> bool:
    """Every given tensor is a CPU tensor (and nothing is being traced): its values can be read for free."""
    return not torch.compiler.is_compiling() and all(t.device.type == "cpu" for t in ts
                                                     if isinstance(t, torch.Tensor))


def _np(t, integer: bool):
    """A numpy view (or int64/float copy) of a host tensor, without a torch op."""
    if t is None:
        return None
    if not integer and t.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16
        return t.to(torch.float32).numpy()
    a = t.numpy()
    return a.astype(np.int64) if integer and a.dtype != np.int64 else a


def check_host(cfg, input_ids, attention_mask, token_type_ids, position_ids, values: bool = True):
    """Check host (CPU) inputs against `cfg` on the host and return them as numpy arrays (ids, mask, tt, pos):
    ids int64 (B, L); mask bool or None; tt, pos int64 or None (defaults are filled in by padding.pack_host).

    The same rules and messages as :func:`check_inputs`, computed with numpy: no torch op, no device involved."""
    _check_meta(cfg, input_ids, attention_mask, token_type_ids, position_ids)
    ids, tt, pos = (_np(t, True) for t in (input_ids, token_type_ids, position_ids))
    mask = _np(attention_mask, False)
    # uint64 >= 2**63 wraps negative in astype(int64), as in the torch path: the range check refuses it
    if values and ids.size:
        for name, a, hi, what in (("input_ids", ids, cfg.vocab_size, "vocab_size"),
                                  ("token_type_ids", tt, cfg.type_vocab_size, "type_vocab_size"),
                                  ("position_ids", pos, cfg.max_position_embeddings, "max_position_embeddings")):
            if a is not None and (a.min() < 0 or a.max() >= hi):
                raise ValueError(f"{name} must lie in [0, {what}={hi}); got values in [{int(a.min())}, "
                                 f"{int(a.max())}]")
        if mask is not None and mask.dtype != np.bool_:
            bad = (mask != 0) & (mask != 1)  # NaN is != both
            if bad.any():
                value = mask[bad][0].item()
                value = int(value) if attention_mask.dtype in INT_DTYPES else float(value)
                raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real token), got {value!r}")
    return ids, None if mask is None else mask != 0, tt, pos


def check_inputs(cfg, input_ids, attention_mask, token_type_ids, position_ids, device, values: bool = True,
                 defaults: bool = True, want_lead: bool = False):
    """Check the model inputs against `cfg` and return (ids, mask, token_type_ids, position_ids) on `device`.

    Every integer dtype is accepted for the ids (converted to int64 once; bool and floating ids are a TypeError);
    the mask may be bool, integer or floating but must hold only 0 and 1. Value checks (id ranges, mask values)
    are one fused reduction and one host synchronisation, skipped when not `values` and under torch.compile (host
    inputs take :func:`check_host` instead, which costs no synchronisation). B = 0 is an empty batch; L = 0 is
    refused (there is no [CLS] token to pool). Returns the mask unchanged in dtype (None when not given), and
    token types / positions filled with their defaults (zeros, 0..L-1) unless not `defaults` (then None). With
    `want_lead`, a fifth value: whether some row starts with padding, read with the checks (None when not read).
    """
    _check_meta(cfg, input_ids, attention_mask, token_type_ids, position_ids)
    B, L = input_ids.shape
    # int64 first: lossless for every integer dtype but uint64 >= 2**63, which wraps negative and fails the range
    # check; comparisons are not implemented for uint16/32/64 tensors anyway
    ids = input_ids.to(device=device, dtype=torch.int64)
    tt = (token_type_ids.to(device=device, dtype=torch.int64) if token_type_ids is not None
          else torch.zeros_like(ids) if defaults else None)
    pos = (position_ids.to(device=device, dtype=torch.int64) if position_ids is not None
           else torch.arange(L, device=device).expand(B, L) if defaults else None)
    mask = None if attention_mask is None else attention_mask.to(device)
    if mask is not None and mask.dtype in (torch.uint16, torch.uint32, torch.uint64):
        mask = mask.to(torch.int64)  # few ops exist for these dtypes; uint64 >= 2**63 turns negative: still not 0/1
    if B == 0 or not values or torch.compiler.is_compiling():  # value checks sync the host: skipped when traced
        return (ids, mask, tt, pos, None) if want_lead else (ids, mask, tt, pos)
    # one small reduction per kind and one read: (min, max) of ids / token types / positions stacked, and whether
    # any mask value is neither 0 nor 1 (m * (1 - m) is 0 only there, exactly, also in wrapping integer math;
    # NaN and inf give nonzero); defaults (None) are valid by construction
    named = [(n, t, hi, what) for n, t, hi, what in (
        ("input_ids", ids, cfg.vocab_size, "vocab_size"),
        ("token_type_ids", tt, cfg.type_vocab_size, "type_vocab_size"),
        ("position_ids", pos, cfg.max_position_embeddings, "max_position_embeddings")) if t is not None]
    lo, hi = torch.aminmax(torch.stack([t.reshape(-1) for _, t, _, _ in named]), dim=1)
    flags = [lo, hi]
    bad_mask = mask is not None and mask.dtype != torch.bool
    if bad_mask:
        flags.append((mask * (1 - mask)).any().view(1).to(torch.int64))
    if want_lead and mask is not None:  # read with the checks: the pooler's left-padding rows (leftpad.py)
        flags.append((mask[:, 0] == 0).any().view(1).to(torch.int64))
    got = torch.cat(flags).tolist()  # the one host sync
    k = len(named)
    for i, (name, _, top, what) in enumerate(named):
        if got[i] < 0 or got[k + i] >= top:
            raise ValueError(f"{name} must lie in [0, {what}={top}); got values in [{got[i]}, {got[k + i]}]")
    if bad_mask and got[2 * k]:
        value = mask[(mask != 0) & (mask != 1)][0].item()  # only on the way to the error (NaN is != both)
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real token), got {value!r}")
    if want_lead:
        return ids, mask, tt, pos, (bool(got[-1]) if mask is not None else None)
    return ids, mask, tt, pos
