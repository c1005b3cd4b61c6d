"""Training activation memory, measured as the bytes autograd saves for the backward.

`saved_activation_bytes(fn, params)` runs `fn()` under `torch.autograd.graph.saved_tensors_hooks` and sums the
sizes of the distinct storages packed for the backward, parameters excluded (a GEMM saving its weight holds no
new memory). Storages are deduplicated, so views (q, k, v of one qkv buffer) and a tensor saved by two ops count
once, as they occupy memory once. This is the peak-relevant activation footprint of a training step, the same
way for any model, on any device (here: CPU, fastdistil's Triton kernels in the interpreter).

    python -m fastdistil.memory [--batch 32 --min-len 16 --max-len 128 --dtype float32]

compares FastStudent (backend triton; TRITON_INTERPRET=1 on CPU) with transformers.BertModel (eager attention)
on the all-MiniLM-L6-v2 architecture in training mode (dropout on), lengths drawn uniformly from
[min_len, max_len], and prints both numbers and their ratio.
"""
from __future__ import annotations

import argparse
import os

import torch


def saved_activation_bytes(fn, params=()) -> tuple[int, object]:
    """(bytes, fn()): total size of the distinct non-parameter storages autograd saved while running fn."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def random_batch(batch: int, min_len: int, max_len: int, vocab: int, seed: int = 0):
    """(input_ids, attention_mask) (B, max length), lengths uniform in [min_len, max_len], right padding."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    L = int(lens.max())
    ids = torch.randint(1, vocab, (batch, L), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).long()
    return ids * mask, mask


def compare(batch: int = 32, min_len: int = 16, max_len: int = 128, dtype=torch.float32, config=None,
            seed: int = 0) -> dict:
    """Saved-activation bytes of one training forward: FastStudent (triton) vs transformers eager."""
    import transformers

    from . import FastStudent
    from .backend import use_backend
    cfg = config or transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                            num_attention_heads=12, intermediate_size=1536,
                                            attn_implementation="eager")
    torch.manual_seed(seed)
    hf = transformers.BertModel(cfg).to(dtype).train()
    ours = FastStudent.from_hf(hf).to(dtype).train()
    ids, mask = random_batch(batch, min_len, max_len, cfg.vocab_size, seed)
    hf_bytes, out = saved_activation_bytes(lambda: hf(input_ids=ids, attention_mask=mask).last_hidden_state,
                                           list(hf.parameters()))
    del out
    with use_backend("triton"):
        our_bytes, out = saved_activation_bytes(lambda: ours(ids, mask).last_hidden_state, list(ours.parameters()))
    del out
    return {"transformers_eager_bytes": hf_bytes, "fastdistil_triton_bytes": our_bytes,
            "ratio": our_bytes / hf_bytes, "tokens": int(mask.sum()), "padded_tokens": mask.numel()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    r = compare(a.batch, a.min_len, a.max_len, getattr(torch, a.dtype))
    mib = 2 ** 20
    print(f"batch {a.batch} x lengths U[{a.min_len},{a.max_len}] ({r['tokens']} real of {r['padded_tokens']} "
          f"padded tokens), {a.dtype}, training mode:")
    print(f"  transformers eager  {r['transformers_eager_bytes'] / mib:9.1f} MiB saved for backward")
    print(f"  fastdistil triton   {r['fastdistil_triton_bytes'] / mib:9.1f} MiB saved for backward")
    print(f"  ratio               {r['ratio']:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
