"""Sentence embeddings with FastStudent: sentence-transformers' mean pooling, computed padding-free.

Texts are tokenised once, sorted by length (longest first) and batched, so each batch pads to a nearby
length; pooling then runs on packed tokens (a segment mean over each sequence's real tokens), and results are
returned in the caller's order.
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch


def load_tokenizer(model):
    """The fast tokenizer saved beside the model's checkpoint (tokenizer.json / vocab.txt)."""
    src = getattr(model, "name_or_path", None)
    if not src:
        raise ValueError("this model was not loaded from a directory; pass tokenizer= (a transformers tokenizer)")
    from .loading import load_tokenizer as checked_tokenizer
    try:
        return checked_tokenizer(src, model.config.vocab_size)  # refuses a tokenizer that does not fit
    except Exception as e:
        raise OSError(f"no usable tokenizer in {src} ({type(e).__name__}: {e}); pass tokenizer=") from None


def sentence_settings(model) -> dict:
    """max_seq_length and pooling mode from a sentence-transformers directory, if the model came from one."""
    out = {"max_seq_length": None, "pooling": "mean"}
    src = getattr(model, "name_or_path", None)
    if not src:
        return out
    for d in (Path(src), Path(src).parent):
        cfg = d / "sentence_bert_config.json"
        if cfg.is_file():
            out["max_seq_length"] = json.loads(cfg.read_text()).get("max_seq_length")
        pool = d / "1_Pooling" / "config.json"
        if pool.is_file():
            p = json.loads(pool.read_text())
            out["pooling"] = "cls" if p.get("pooling_mode_cls_token") else "mean"
        if cfg.is_file() or pool.is_file():
            break
    return out


def pool_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """(T, d) packed tokens -> (B, d): mean over each sequence's tokens, or its first token. An empty sequence
    pools to zeros."""
    B = cu_seqlens.shape[0] - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(x.dtype)  # (B,)
    if mode == "cls":
        first = cu_seqlens[:-1].long().clamp(max=max(x.shape[0] - 1, 0))
        return torch.where((lens > 0)[:, None], x[first], torch.zeros_like(x[:B]))
    seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(x.shape[0], device=x.device), right=True)
    sums = x.new_zeros(B, x.shape[1]).index_add_(0, seq, x)
    return sums / lens.clamp(min=1)[:, None]


@torch.inference_mode()
def encode(model, texts, tokenizer=None, *, batch_size: int = 64, normalize: bool = True, max_length=None,
           show_progress: bool = False) -> torch.Tensor:
    """Embed `texts` (a list of str). Returns float32 (N, d) on CPU, in the input order."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or
                                   max_length < 2):
        raise ValueError(f"max_length must be None or an integer >= 2 ([CLS] and [SEP]), got {max_length!r}")
    tok = tokenizer or load_tokenizer(model)
    st = sentence_settings(model)
    max_length = max_length or st["max_seq_length"] or model.config.max_position_embeddings
    max_length = min(int(max_length), model.config.max_sequence_length)
    ids = tok(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    out = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float32)
    from tqdm.auto import tqdm
    # closed on the way out of an exception too (Ctrl-C): a bar left open redraws after the CLI's last line
    with tqdm(total=len(texts), desc="embedding", unit="text", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            L = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), L), tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros(len(idx), L, dtype=torch.long)
            for r, i in enumerate(idx):
                batch[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            tids, tt, pos, p = model.prepare(batch, mask)  # host tensors: packed on the host, one copy to dev
            x, _ = model.forward_packed(tids, tt, pos, p)  # (T, d)
            e = pool_packed(x.float(), p.cu_seqlens, st["pooling"])
            if normalize:
                e = torch.nn.functional.normalize(e, dim=-1)
            out[torch.tensor(idx)] = e.cpu()
            bar.update(len(idx))
    return out


__all__ = ["encode", "pool_packed", "load_tokenizer", "sentence_settings"]
