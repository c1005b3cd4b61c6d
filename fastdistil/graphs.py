"""CUDA-graph replay of FastStudent's inference forward and of sentence embedding, one graph per bucket.

    runner = model.cuda_graphs()                 # or fastdistil.GraphRunner(model)
    out = runner(input_ids, attention_mask)      # like model(...) under inference_mode, replayed from a graph
    emb = runner.encode(texts, tokenizer)        # like model.encode(...)

A batch of shape (B, L) runs in the graph of its bucket (bucket_batch(B), bucket_length(L)): batch sizes rounded
up to a power of two up to 8 and to a multiple of 8 above, lengths up to a multiple of `length_multiple` (16),
capped at max_batch and at the model's longest sequence. The inputs are checked on the host (fastdistil/inputs.py:
free for tokenizer output; one fused check and one sync for GPU-resident inputs), padded with numpy into one
bucket-shaped buffer and copied into the graph's static input buffer in one host-to-device copy; the graph runs
the sync-free forward (capacity layout, fastdistil/padding.py) with input checks off, and the caller gets copies
of the (B, L) slice of its outputs.

Waste bound: a bucket holds fewer than min(2B, B + 8) rows and L + length_multiple - 1 columns, so it computes
fewer than min(2, 1 + 7/B) x (1 + 15/L) times the padded batch's tokens (1 x 32: 1x; 5 x 23: 1.6 x 1.39;
32 x 128: 1x). The GEMMs, LayerNorms and GELUs compute every bucket row (padding rows too, including the batch's
own padding: T real tokens cost B x L rows there); attention, the only quadratic op, skips padding rows (it reads
cu_seqlens on the device).

Memory: every graph draws on one shared pool (graphs run one at a time, and outputs are copied out right after
each replay), so the pool holds about the activations of the largest bucket used (a few (rows, d) tensors and
one (rows, intermediate) at once, rows = bucket batch x bucket length) plus, per captured bucket, its static
inputs and outputs: rows x (24 + d x elem_bytes) bytes (about 3.2 MB for 32 x 128 at d = 384 in bf16). Graphs
are captured lazily, on a bucket's first use (one eager warm-up run, then the capture). After changing the
model's weights or moving it, call reset(): a graph replays the buffers it captured.

Without CUDA (capture=False, the default on CPU) the runner runs the same static-buffer code eagerly: that is
how the bucketing is tested here, and the no-sync test of tests/test_sync_free.py covers the captured code.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .inputs import check_host, check_inputs, is_host
from .outputs import ModelOutput


def bucket_batch(b: int, max_batch: int, step: int = 8) -> int:
    """b rounded up to a power of two up to `step`, then to a multiple of `step`; at most max_batch (b itself
    when that is larger: a bucket of exactly b). So the bucket is < 2b, and < b + step."""
    r = 1 << max(b - 1, 0).bit_length() if b <= step else -(-b // step) * step
    return max(b, min(r, max_batch))


def bucket_length(n: int, multiple: int, max_length: int) -> int:
    """n rounded up to a multiple of `multiple`, at most max_length."""
    return min(-(-n // multiple) * multiple, max(max_length, n))


class _Graph:
    """One bucket: static input buffer (3, b, l) int64 = ids, mask, token types; its outputs; its graph."""

    def __init__(self, runner: "GraphRunner", kind: tuple, b: int, l: int, lead: bool):
        self.runner, self.kind, self.lead = runner, kind, lead
        self.inputs = torch.zeros(3, b, l, dtype=torch.int64, device=runner.model.device)
        self.graph = None
        if runner.capture:
            self._capture()

    def run_eager(self):
        ids, mask, tt = self.inputs.unbind(0)
        with torch.inference_mode():
            return self.runner._compute(self.kind, ids, mask, tt, self.lead)

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: the kernels' first-launch compilation and allocator growth
            self.run_eager()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.runner._pool()):
            self.outputs = self.run_eager()

    def __call__(self):
        if self.graph is None:
            return self.run_eager()
        self.graph.replay()
        return self.outputs


class GraphRunner:
    """CUDA-graph replay of `model`'s inference forward (and of sentence embedding), one graph per bucket.

    Args:
        model: a FastStudent in eval mode.
        max_batch: the largest batch bucket (bigger batches get a bucket of their own size).
        length_multiple: lengths are rounded up to a multiple of this (16).
        capture: capture CUDA graphs (default: when the model is on a CUDA device); False runs the same
            static-buffer forward eagerly.
    """

    def __init__(self, model, *, max_batch: int = 128, length_multiple: int = 16, capture: bool | None = None):
        if model.training:
            raise ValueError("GraphRunner captures inference: call model.eval() first (dropout would be frozen)")
        for name, v in (("max_batch", max_batch), ("length_multiple", length_multiple)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if capture is None:
            capture = model.device.type == "cuda"
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on {model.device}")
        self.model, self.max_batch, self.multiple, self.capture = model, int(max_batch), int(length_multiple), capture
        cfg = model.config
        self.max_length = getattr(cfg, "max_sequence_length", cfg.max_position_embeddings)  # RoBERTa: 2 fewer
        self.graphs: dict = {}
        self._pool_handle = None

    def _pool(self):
        if self._pool_handle is None:
            self._pool_handle = torch.cuda.graph_pool_handle()
        return self._pool_handle

    def reset(self) -> None:
        """Drop every captured graph (after the weights changed or the model moved); they are recaptured lazily."""
        self.graphs.clear()
        self._pool_handle = None

    def bucket(self, batch: int, length: int) -> tuple[int, int]:
        """The (batch, length) bucket that a (batch, length) input runs in."""
        return bucket_batch(batch, self.max_batch), bucket_length(length, self.multiple, self.max_length)

    def _compute(self, kind: tuple, ids, mask, tt, lead):
        """What a graph records: the sync-free forward on static buffers (checked before: check=False), and for
        kind ("embed", pooling, normalize) the sentence pooling."""
        out = self.model._forward(ids, mask, tt, None, check=False, lead=lead, static=True)
        if kind[0] == "forward":
            return out.last_hidden_state, out.pooler_output
        _, pooling, normalize = kind
        w = mask.to(out.last_hidden_state.dtype)[..., None]  # (b, l, 1)
        if pooling == "cls":
            e = out.last_hidden_state[:, 0]
        else:
            e = (out.last_hidden_state * w).sum(1) / w.sum(1).clamp(min=1)  # mean over real tokens
        e = e.float()
        return (torch.nn.functional.normalize(e, dim=-1) if normalize else e), None

    def _stage(self, kind: tuple, input_ids, attention_mask, token_type_ids, check: bool):
        """Check the inputs, pick the bucket, fill its static buffer. Returns (graph, B, L).

        Host inputs: checked and padded with numpy, one host-to-device copy. Device inputs: one fused check and
        one read of its flags (check=False skips them), one read of whether a row starts with padding, and
        device-to-device copies into the buffer."""
        cfg = self.model.config
        host = is_host(input_ids, attention_mask, token_type_ids)
        if host:
            ids, mask, tt, _ = check_host(cfg, input_ids, attention_mask, token_type_ids, None, values=check)
            lead = mask is not None and bool((~mask[:, 0]).any())  # a real row starting with padding
        else:
            ids, mask, tt, _, lead = check_inputs(cfg, input_ids, attention_mask, token_type_ids, None,
                                                  self.model.device, values=check, defaults=False, want_lead=True)
            if lead is None:  # not read with the checks (check=False): its own read
                lead = mask is not None and bool((mask[:, 0] == 0).any())
        B, L = ids.shape
        b, l = self.bucket(B, L)
        key = (kind, b, l, lead)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = _Graph(self, kind, b, l, lead)
        if host:
            buf = np.zeros((3, b, l), dtype=np.int64)
            buf[0].fill(cfg.pad_token_id or 0)
            buf[0, :B, :L] = ids
            buf[1, :B, :L] = 1 if mask is None else mask
            if tt is not None:
                buf[2, :B, :L] = tt
            g.inputs.copy_(torch.from_numpy(buf), non_blocking=True)
        else:
            g.inputs[0].fill_(cfg.pad_token_id or 0)
            g.inputs[1:].zero_()
            g.inputs[0, :B, :L].copy_(ids)
            if mask is None:
                g.inputs[1, :B, :L].fill_(1)
            else:
                g.inputs[1, :B, :L].copy_(mask != 0)
            if tt is not None:
                g.inputs[2, :B, :L].copy_(tt)
        return g, B, L

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, check_inputs: bool = True):
        """FastStudent.forward's outputs (last_hidden_state (B, L, d), pooler_output (B, d)) from the graph of
        the inputs' bucket. The outputs are copies: they stay valid across later calls."""
        g, B, L = self._stage(("forward",), input_ids, attention_mask, token_type_ids, check_inputs)
        last, pooled = g()
        return ModelOutput(last_hidden_state=last[:B, :L].clone(),
                           pooler_output=None if pooled is None else pooled[:B].clone(), hidden_states=None)

    def embed(self, input_ids, attention_mask=None, token_type_ids=None, *, pooling: str = "mean",
              normalize: bool = True, check_inputs: bool = True) -> torch.Tensor:
        """Sentence embeddings (B, d) float32: mean over real tokens (or the [CLS] row), L2-normalised."""
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        g, B, _ = self._stage(("embed", pooling, bool(normalize)), input_ids, attention_mask, token_type_ids,
                              check_inputs)
        return g()[0][:B].clone()

    def encode(self, texts, tokenizer=None, *, batch_size: int = 64, normalize: bool = True, max_length=None):
        """FastStudent.encode through the graphs: (N, d) float32 on the CPU, in the input order."""
        from .embed import load_tokenizer, sentence_settings
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        texts = list(texts)
        tok = tokenizer or load_tokenizer(self.model)
        st = sentence_settings(self.model)
        n = min(int(max_length or st["max_seq_length"] or self.max_length), self.max_length)
        ids = tok(texts, add_special_tokens=True, truncation=True, max_length=n)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size, dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            L = max(len(ids[i]) for i in idx)
            batch = np.full((len(idx), L), tok.pad_token_id or 0, dtype=np.int64)
            mask = np.zeros((len(idx), L), dtype=np.int64)
            for r, i in enumerate(idx):
                batch[r, :len(ids[i])], mask[r, :len(ids[i])] = ids[i], 1
            e = self.embed(torch.from_numpy(batch), torch.from_numpy(mask), pooling=st["pooling"],
                           normalize=normalize)
            out[torch.tensor(idx)] = e.cpu()
        return out
