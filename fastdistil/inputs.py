"""The model's input checks: one rule for every backend, a clear error at the boundary, never a silent guess.

`check_inputs` takes what FastStudent.forward was given and returns it checked and normalised (ids as int64 on
the model's device), with one host synchronisation for all value checks. `check_hf_kwargs` handles the keyword
arguments of transformers' BertModel.forward that FastStudent has no use for: harmless values are accepted,
others refused by name, and any other keyword is a TypeError, as for any Python function.
"""
from __future__ import annotations

import difflib

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
_OWN = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "output_hidden_states", "return_dict")


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


def check_inputs(cfg, input_ids, attention_mask, token_type_ids, position_ids, device):
    """Check the model inputs against `cfg` and return (ids, mask, token_type_ids, position_ids) on `device`.

    Every integer dtype is accepted for the ids (converted to int64 once; bool and floating ids are a TypeError);
    the mask may be bool, integer or floating but must hold only 0 and 1. Value checks (id ranges, mask values)
    cost one host synchronisation and are skipped under torch.compile. B = 0 is an empty batch; L = 0 is refused
    (there is no [CLS] token to pool). Returns the mask unchanged in dtype (None when not given).
    """
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
    # int64 first: lossless for every integer dtype but uint64 >= 2**63, which wraps negative and fails the range
    # check; comparisons are not implemented for uint16/32/64 tensors anyway
    ids = input_ids.to(device=device, dtype=torch.int64)
    tt = (torch.zeros_like(ids) if token_type_ids is None else token_type_ids.to(device=device, dtype=torch.int64))
    pos = (torch.arange(L, device=device).expand(B, L) if position_ids is None
           else position_ids.to(device=device, dtype=torch.int64))
    mask = None if attention_mask is None else attention_mask.to(device)
    if mask is not None and mask.dtype in (torch.uint16, torch.uint32, torch.uint64):
        mask = mask.to(torch.int64)  # few ops exist for these dtypes; uint64 >= 2**63 turns negative: still not 0/1
    if B == 0 or torch.compiler.is_compiling():  # value checks sync the host: skipped when traced
        return ids, mask, tt, pos
    checks = [(ids < 0).any(), (ids >= cfg.vocab_size).any(), (tt < 0).any(), (tt >= cfg.type_vocab_size).any(),
              (pos < 0).any(), (pos >= cfg.max_position_embeddings).any()]
    bad_mask = None
    if mask is not None and mask.dtype != torch.bool:
        bad_mask = (mask != 0) & (mask != 1)  # NaN is != both
        checks.append(bad_mask.any())
    bad = torch.stack(checks).tolist()  # the one host sync
    if bad[0] or bad[1]:
        raise ValueError(f"input_ids must lie in [0, vocab_size={cfg.vocab_size}); got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    if bad[2] or bad[3]:
        raise ValueError(f"token_type_ids must lie in [0, type_vocab_size={cfg.type_vocab_size}); got values in "
                         f"[{int(tt.min())}, {int(tt.max())}]")
    if bad[4] or bad[5]:
        raise ValueError(f"position_ids must lie in [0, max_position_embeddings={cfg.max_position_embeddings}); "
                         f"got values in [{int(pos.min())}, {int(pos.max())}]")
    if bad_mask is not None and bad[6]:
        value = mask[bad_mask][0].item()
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real token), got {value!r}")
    return ids, mask, tt, pos
