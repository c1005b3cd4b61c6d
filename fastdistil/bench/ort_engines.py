"""ONNX Runtime, the CPU peer: transformers' eager-attention model, legacy-exported once per context, BERT-fused by
onnxruntime.transformers' optimizer, run padded, bucketed (ORT_BUCKET rows of similar lengths) or per sequence. The
registry in bench/engines.py names these engines; bench/int8_engines.py quantizes the same export."""
from __future__ import annotations

import os
import time

import torch

from .engines import Context, Engine, ORT_BUCKET, Skip, hf_model


class OnnxRuntimeEngine(Engine):
    """transformers' eager-attention model, legacy-exported, BERT-fused, on ONNX Runtime (fp32)."""
    family = "onnxruntime"

    def __init__(self, name, mode: str):
        super().__init__(name, "ort", torch.float32)
        self.mode = mode  # "padded", "bucketed" or "per-seq"

    def setup(self, ctx):
        super().setup(ctx)
        try:
            import onnxruntime as ort
        except ImportError:
            raise Skip("onnxruntime is not installed (pip install fastdistil[bench])") from None
        providers = ["CPUExecutionProvider"]
        if ctx.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise Skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
            providers = ["CUDAExecutionProvider"]
        path = self.model_path(ctx)
        so = ort.SessionOptions()
        so.intra_op_num_threads = ctx.threads
        # ORT's workers spin after each run by default, taking the 2 cores from whichever engine is timed next in
        # an interleaved round; without spinning every engine sees the same idle machine.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(path, so, providers=providers)
        ids, mask = ctx.ids.cpu(), ctx.mask.cpu()
        lens = ctx.seqlens
        if self.mode == "padded":
            self.feeds = [({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, list(range(len(lens))))]
        elif self.mode == "bucketed":
            order = sorted(range(len(lens)), key=lambda i: lens[i])
            self.feeds = []
            for s in range(0, len(order), ORT_BUCKET):
                idx = order[s:s + ORT_BUCKET]
                n = max(lens[i] for i in idx)
                self.feeds.append(({"input_ids": ids[idx, :n].numpy(), "attention_mask": mask[idx, :n].numpy()},
                                   idx))
        elif self.mode == "per-seq":
            self.feeds = [({"input_ids": ids[i:i + 1, :lens[i]].numpy(),
                            "attention_mask": mask[i:i + 1, :lens[i]].numpy()}, [i]) for i in range(len(lens))]
        else:
            raise ValueError(f"unknown ONNX Runtime mode {self.mode!r}")

    def model_path(self, ctx) -> str:
        """The fused fp32 export, made once per context (int8_engines.py quantizes it)."""
        path = ctx.scratch.get("onnx")
        if path is None:
            t = time.perf_counter()
            path = export_onnx(ctx)
            ctx.scratch["onnx"] = path
            ctx.scratch["onnx_export_s"] = round(time.perf_counter() - t, 1)
        self.extra.update(export_s=ctx.scratch["onnx_export_s"], fused_ops=ctx.scratch.get("onnx_fused", {}))
        return path

    def __call__(self):
        return [self.session.run(["last_hidden_state"], feed)[0] for feed, _ in self.feeds]

    def check(self):
        outs = self()
        lens = self.ctx.seqlens
        rows = [None] * len(lens)
        for (feed, idx), out in zip(self.feeds, outs):
            for j, i in enumerate(idx):
                rows[i] = torch.from_numpy(out[j, :lens[i]]).float()
        return torch.cat(rows)


def export_onnx(ctx: Context) -> str:
    """Export the reference model (eager attention, fp32) with the legacy exporter and apply ONNX Runtime's BERT
    fusions; returns the fused model's path (in ctx.tmpdir)."""
    class _Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    try:
        import onnx  # noqa: F401
    except ImportError:
        raise Skip("onnx is not installed (pip install fastdistil[bench])") from None
    m = hf_model(Context(ctx.workload, torch.device("cpu"), ctx.threads, ctx.hf_config, ctx.state, ctx.weights),
                 "eager")
    raw = os.path.join(ctx.tmpdir, "model.onnx")
    fused = os.path.join(ctx.tmpdir, "model.fused.onnx")
    ids, mask = ctx.ids[:2, :16].cpu(), ctx.mask[:2, :16].cpu()
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrap(m), (ids, mask), raw, dynamo=False, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "last_hidden_state": {0: "batch", 1: "seq"}})
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        return raw
    import logging
    c = ctx.hf_config
    logging.disable(logging.WARNING)  # the optimizer logs every fusion step; the fused ops are reported instead
    try:
        om = optimize_model(raw, model_type="bert", num_heads=c.num_attention_heads, hidden_size=c.hidden_size,
                            opt_level=0)
        ctx.scratch["onnx_fused"] = {k: v for k, v in om.get_fused_operator_statistics().items() if v}
        om.save_model_to_file(fused)
    finally:
        logging.disable(logging.NOTSET)
    return fused
