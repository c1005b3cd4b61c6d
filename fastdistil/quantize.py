"""int8 inference on CPU with a measured accuracy bound: `model.quantize("int8")`.

Each GEMM of the encoder layers (Q, K, V, attention-output, FFN-in, FFN-out) becomes an :class:`Int8Linear`:
  weights     W' = W * s (per input channel, SmoothQuant), quantised symmetric int8 per output channel, once;
  activations x' = x / s quantised asymmetric uint8 per row (min..max in 255 levels), at run time, on the packed
              real tokens (T, d): padding is never in the packed tensor, so it cannot enter a scale;
  GEMM        oneDNN u8s8 (VNNI / AMX where present), fp32 out (acc * w_scale);
  epilogue    y = row_scale * acc' + row_min * sum_k W' + b (csrc/quantize.cpp, or torch ops).
A few outlier rows (tokens whose range would swamp 8 bits, above a limit fixed at calibration) run in fp32.
Softmax, LayerNorm and GELU stay fp32. The smoothing s_j = max|x_j|^a / max|W_j|^(1-a) moves the outlier
channels of BERT's activations into the weights, where per-channel scales absorb them. On all-MiniLM-L6-v2 these
three (asymmetric rows, smoothing, fp32 outlier rows) took the worst calibration cosine of all-int8 from 0.976
(symmetric per-row) to 0.998.

Calibration measures the error it causes: mean-pooled embeddings of the int8 model against fp32 on a calibration
set (fastdistil/data/calibration.txt by default), worst sequence's cosine. Where that is below `min_cosine`, each
GEMM's sensitivity (how much the worst sequences improve when it alone is fp32, per FLOP) ranks them and the
most sensitive go back to fp32 one at a time until the bound holds; the cosine reached is kept in
`model.quantization` and logged.

CPUs without VNNI (AVX2 or AVX-512 before Cascade Lake) multiply u8 x s8 pairs into saturating int16
(VPMADDUBSW): 2 * 255 * 127 overflows, so activations get 7 bits there (127 levels: 2 * 127 * 127 does not; on
all-MiniLM-L6-v2 7-bit activations lose less than 7-bit weights would), and calibration keeps more GEMMs fp32.
Which case holds is measured, not guessed: a tiny probe GEMM built to saturate (see :func:`int8_support`). Where
oneDNN's int8 GEMM is missing or wrong, quantize warns and the model stays fp32.

State dicts: an Int8Linear keeps the original fp32 `weight` and `bias` as its parameters (the int8 copies are
derived, cached outside the module, rebuilt when the weight changes), so `state_dict()` / `save_pretrained` of a
quantized model write the original fp32 weights with transformers' keys: a saved model loads as fp32, to be
quantized again.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from importlib import resources

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weight_cache import derived

log = logging.getLogger("fastdistil.quantize")

MODES = ("int8",)
GEMMS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")


# ------------------------------------------------------------------------------------------------ capability
_SUPPORT: dict = {}


def int8_support() -> tuple[int, str]:
    """(levels, reason): activation levels 255 where oneDNN's u8s8 GEMM is exact, 127 where full-range uint8
    saturates its int16 pairs (no VNNI), 0 where int8 is unavailable (then `reason` says why). Measured once per
    process with a probe built to saturate, inside try/except: no oneDNN error reaches the caller."""
    if "v" not in _SUPPORT:
        _SUPPORT["v"] = _probe()
    return _SUPPORT["v"]


def _probe() -> tuple[int, str]:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
            and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return 0, "this torch has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)"
    K, N = 64, 8
    w = torch.full((N, K), 127, dtype=torch.int8)
    w[1::2] = -127
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        for levels in (255, 127):
            x = torch.full((4, K), levels, dtype=torch.uint8)  # zero point 0: every product levels * +-127
            y = _qgemm(x, 0, packed, torch.ones(N), torch.zeros(N, dtype=torch.long))
            if torch.equal(y.double(), levels * w[:, 0].double().expand(4, N) * K):
                return levels, ("u8s8 exact" if levels == 255 else
                                "u8 x s8 pairs saturate int16 here (no VNNI): 7-bit activations")
        return 0, "oneDNN's int8 GEMM gave wrong results on a probe"
    except (RuntimeError, NotImplementedError) as e:
        return 0, f"oneDNN's int8 GEMM failed on this CPU ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


def _native_ops():
    """torch.ops.fastdistil_int8 (csrc/quantize.cpp: one-pass row quantisation and epilogue) when the C++
    extension is built, else None (the same maths in torch ops, several passes each)."""
    if "ops" not in _SUPPORT:
        try:
            from . import _C  # noqa: F401  (loading the extension registers the ops)
            ops = torch.ops.fastdistil_int8
            ops.quantize_rows(torch.ones(1, 4), torch.ones(4), 255.0)  # a build with another schema raises here
            _SUPPORT["ops"] = ops if hasattr(ops, "epilogue_") else None
        except (ImportError, OSError, AttributeError, RuntimeError, TypeError, ValueError):
            _SUPPORT["ops"] = None
    return _SUPPORT["ops"]


def _qgemm(q, zp, packed, w_scale, w_zp):
    """(T, K) uint8 activations (zero point zp, scale 1) x packed int8 weights -> (T, N) fp32 acc * w_scale."""
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, zp, packed, w_scale, w_zp, None, 1.0, 0, torch.float32,
                                             "none", [], "")


# ------------------------------------------------------------------------------------------------ the module
def quantize_rows(xs: torch.Tensor, levels: int = 255):
    """Asymmetric per-row uint8 of xs (T, K) fp32: q = round((x - min) / s) in [0, levels], s = (max - min) / levels.
    Returns (q (T, K) uint8, s (T, 1), min (T, 1), max (T, 1)); x ~ s * q + min. A constant row gets q = 0."""
    mn, mx = torch.aminmax(xs, dim=1, keepdim=True)  # (T, 1) each
    s = (mx - mn).div_(float(levels)).clamp_(min=1e-30)
    r = 1.0 / s
    # (x - min) / s + 0.5 lies in [0.5, levels + 0.5]: the float -> uint8 cast truncates, so this rounds half up
    return torch.addcmul(0.5 - mn * r, xs, r).clamp_(0, levels).to(torch.uint8), s, mn, mx


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear in inference: int8 weights (per output channel) x uint8 activations (per row).

    y = s_t * (q_t . W'q) + min_t * sum_k W'_k + b, with W' = W * smooth quantised per output channel and
    x / smooth quantised per row t. Rows whose smoothed absmax exceeds `row_limit` (BERT's few outlier tokens,
    [CLS]/[SEP]-like, whose range would swamp 8 bits) run in fp32; the limit is fixed at calibration, so a
    row's treatment never depends on the other rows of the batch. `int8 = False` runs the whole GEMM in fp32.

    Holds the original fp32 `weight` and `bias` Parameters (state-dict keys unchanged); the int8 weights are
    derived from them, cached outside the module (fastdistil/weight_cache.py) and rebuilt when the weight changes.
    Inference only: training mode, or an input that needs a gradient, is a RuntimeError.

    Args:
        linear: the nn.Linear to replace (its Parameters are shared, not copied).
        smooth: (in_features,) SmoothQuant factors, or None (ones).
        levels: activation levels, 255, or 127 on CPUs whose u8s8 dot products saturate (see int8_support).
        row_limit: rows of x / smooth with a larger absmax run in fp32 (inf: none).
    """

    def __init__(self, linear: nn.Linear, smooth: torch.Tensor | None = None, levels: int = 255,
                 row_limit: float = math.inf):
        super().__init__()
        if linear.weight.is_inference():  # updated in place without a version bump: a cache could go stale
            raise ValueError("this model's weights are inference tensors (built or loaded under "
                             "torch.inference_mode()); build it outside inference_mode to quantize it")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        with torch.inference_mode(False):  # a normal tensor (version-counted) even when made under inference_mode
            s = torch.ones(self.in_features) if smooth is None else smooth.detach().float().clone()
        self.register_buffer("smooth", s, persistent=False)  # (K,)
        self.levels, self.row_limit, self.int8 = int(levels), float(row_limit), True
        self.eval()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{'int8' if self.int8 else 'fp32 (kept by calibration)'}")

    def _packed(self):
        """(packed int8 W' (N, K), w_scale (N,), zero points (N,), sum_k dequant(W') (N,), 1/smooth (K,),
        zeros (N,)): built once per weight version."""
        def build(ts):
            w = ts[0].detach().float() * ts[1]  # (N, K): the smoothing moves into the weight
            ws = w.abs().amax(1).clamp_(min=1e-30) / 127  # (N,)
            wq = torch.round(w / ws[:, None]).clamp_(-127, 127).to(torch.int8)
            wsum = (wq.float() * ws[:, None]).sum(1)  # (N,): the min_t term of each output
            return (torch.ops.onednn.qlinear_prepack(wq, None), ws, torch.zeros_like(ws, dtype=torch.long), wsum,
                    (1.0 / ts[1]).contiguous(), torch.zeros_like(ws))
        ts = (self.weight, self.smooth)
        if any(t.is_inference() for t in ts):  # (a copy made under inference_mode): no version to key a cache on
            with torch.no_grad():
                return build(ts)
        return derived("int8", ts, build)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the int8 GEMM computes with, in fp32 (N, K): dequant(W') / smooth."""
        w = self.weight.detach().float() * self.smooth
        ws = w.abs().amax(1, keepdim=True).clamp_(min=1e-30) / 127
        return torch.round(w / ws).clamp_(-127, 127) * ws / self.smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (torch.is_grad_enabled() and x.requires_grad):
            raise RuntimeError("an int8-quantized model is inference-only: call model.eval() and run it under "
                               "torch.inference_mode() or torch.no_grad()")
        if x.device.type != "cpu":
            raise RuntimeError(f"int8 GEMMs run on CPU only; got a tensor on {x.device}")
        if not self.int8:
            return F.linear(x, self.weight, self.bias)
        packed, ws, wzp, wsum, inv, zeros = self._packed()
        shape, x2 = x.shape, x.reshape(-1, self.in_features).float().contiguous()
        b = zeros if self.bias is None else self.bias.float()
        native = _native_ops()
        if native is not None:  # one pass each (csrc/quantize.cpp)
            q, s, mn, mx = native.quantize_rows(x2, inv, float(self.levels))  # (T, K) uint8; (T, 1) each
            y = native.epilogue_(_qgemm(q, 0, packed, ws, wzp), s, mn, wsum, b)
        else:
            q, s, mn, mx = quantize_rows(x2 * inv, self.levels)
            y = torch.addcmul(b, _qgemm(q, 0, packed, ws, wzp), s).addr_(mn.view(-1), wsum)
        # y = s_t * sum_k q W'q + min_t * sum_k W' + b, (T, N)
        if self.row_limit < math.inf:
            big = torch.maximum(mx, -mn).view(-1) > self.row_limit
            if bool(big.any()):  # (the few outlier tokens: an fp32 GEMM on their rows only)
                idx = big.nonzero().view(-1)
                y.index_copy_(0, idx, F.linear(x2.index_select(0, idx).float(), self.weight.float(),
                                               None if self.bias is None else self.bias.float()))
        return y.view(*shape[:-1], self.out_features).to(x.dtype)


# ------------------------------------------------------------------------------------------------ calibration
@dataclass
class QuantizationReport:
    """What quantize() did and the accuracy it measured (worst-sequence cosine of mean-pooled embeddings)."""
    mode: str
    min_cosine: float                # the bound asked for
    worst_cosine: float              # the calibration set's worst sequence, int8 vs fp32
    calibration: str                 # where the texts came from, and how many
    activation_bits: int
    int8_gemms: list = field(default_factory=list)
    fp32_gemms: list = field(default_factory=list)
    note: str = ""

    def __str__(self) -> str:
        return (f"{self.mode}: {len(self.int8_gemms)} GEMMs int8, {len(self.fp32_gemms)} kept fp32 "
                f"({', '.join(self.fp32_gemms) or 'none'}); worst-sequence cosine {self.worst_cosine:.5f} "
                f"(bound {self.min_cosine}) on {self.calibration}; 8-bit weights, "
                f"{self.activation_bits}-bit activations"
                + (f"; {self.note}" if self.note else ""))


def default_texts(name: str = "calibration") -> list[str]:
    """The shipped English sentences: "calibration" (what quantize() measures on) or "heldout" (for tests and
    benchmarks; never used by quantize)."""
    text = resources.files("fastdistil").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    return [t for t in text.splitlines() if t.strip()]


def _module(layer: nn.Module, name: str) -> nn.Module:
    for part in name.split("."):
        layer = layer[part] if isinstance(layer, nn.ModuleDict) else getattr(layer, part)
    return layer


def _replace(layer: nn.Module, name: str, new: nn.Module) -> None:
    *path, last = name.split(".")
    _module(layer, ".".join(path))[last] = new


def _plain_linear(m: nn.Module) -> nn.Linear:
    """An nn.Linear holding the Parameters of an Int8Linear (or `m` itself when it is one already)."""
    if not isinstance(m, Int8Linear):
        return m
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    lin.weight, lin.bias = m.weight, m.bias
    return lin


def dequantize(model) -> None:
    """Put every Int8Linear of `model` back to the nn.Linear it replaced (same Parameters): the fp32 model."""
    enc = getattr(model, "bert", model)
    for layer in enc.layers:
        for name in GEMMS:
            _replace(layer, name, _plain_linear(_module(layer, name)))
    if hasattr(enc, "quantization"):
        del enc.quantization


def token_ids(model, calibration, tokenizer=None) -> list:
    """Each calibration sequence as a token-id list: texts are tokenized with the model's tokenizer (or
    `tokenizer`), token-id lists are taken as they are."""
    if isinstance(calibration, (str, bytes)):
        raise TypeError("calibration must be a list of texts, not a single string")
    items = list(calibration)
    if not items:
        raise ValueError("calibration is empty: pass None (the shipped sentences) or a non-empty list of texts")
    if all(isinstance(t, str) for t in items):
        from .embed import load_tokenizer
        tok = tokenizer or load_tokenizer(model)
        n = min(model.config.max_position_embeddings, 512)
        return tok(items, add_special_tokens=True, truncation=True, max_length=n)["input_ids"]
    if all(isinstance(t, (list, tuple)) and t and all(isinstance(i, int) for i in t) for t in items):
        return [list(t) for t in items]
    raise TypeError("calibration must be a list of strings or a list of token-id lists")


def batches(seqs: list, batch_size: int = 64) -> list:
    """[(input_ids, attention_mask, original indices)] of token-id lists, sorted by length, right-padded."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        L = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        out.append((ids, mask, idx))
    return out


@torch.inference_mode()
def pooled_embeddings(model, bs) -> torch.Tensor:
    """(N, d) fp32 mean-pooled last hidden states of every sequence, in the original order."""
    from .embed import pool_packed
    enc = getattr(model, "bert", model)
    out = torch.empty(sum(len(b[2]) for b in bs), enc.config.hidden_size)
    for ids, mask, idx in bs:
        tids, tt, pos, p = enc.prepare(ids, mask)
        x, _ = enc.forward_packed(tids, tt, pos, p)
        out[torch.tensor(idx)] = pool_packed(x.float(), p.cu_seqlens)
    return out


def worst_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest row-wise cosine between two (N, d) embedding sets."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=1).min())


def _input_stats(enc, bs, fn):
    """Run the fp32 model over the batches `bs` with fn(key, x) called on every GEMM's input x (T, K)."""
    hooks = []
    for li, layer in enumerate(enc.layers):
        for name in GEMMS:
            hooks.append(_module(layer, name).register_forward_hook(
                lambda m, inp, out, key=(li, name): fn(key, inp[0].detach().float())))
    try:
        return pooled_embeddings(enc, bs)
    finally:
        for h in hooks:
            h.remove()


def quantize(model, mode: str = "int8", *, calibration=None, min_cosine: float = 0.998, tokenizer=None,
             alpha: float = 0.5, row_factor: float = 3.0, batch_size: int = 64, show_progress: bool = False):
    """Quantize the encoder GEMMs of `model` (a FastStudent, or a head holding one as `.bert`) in place.

    Args:
        mode: "int8" (the only mode).
        calibration: None (fastdistil/data/calibration.txt, 327 English sentences), a list of texts (tokenized
            with the model's tokenizer or `tokenizer`), or a list of token-id lists.
        min_cosine: the bound: worst-sequence cosine of mean-pooled embeddings, int8 against fp32, on the
            calibration set. GEMMs whose int8 error matters most per FLOP saved are kept fp32 until it holds.
        alpha: SmoothQuant migration strength (0: none).
        row_factor: rows whose smoothed absmax exceeds row_factor x the calibration median run in fp32.
    Returns:
        the model, with the encoder's parameters set requires_grad=False; `quantization` on the encoder (the model,
        or `model.bert`) is a QuantizationReport: the GEMMs kept fp32 and the worst cosine reached.
    Raises:
        ValueError: unknown mode, a bound outside (0, 1], a model not on CPU, not float32, or in training mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(min_cosine, bool) or not isinstance(min_cosine, (int, float)) or not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be a number in (0, 1], got {min_cosine!r}")
    enc = getattr(model, "bert", model)
    dev, dt = enc.device, enc.dtype
    if dev.type != "cpu":
        raise ValueError(f"int8 quantization runs on CPU; the model is on {dev} (call model.cpu() first)")
    if dt != torch.float32:
        raise ValueError(f"quantize a float32 model (this one is {dt}): the int8 GEMMs are checked against fp32")
    if model.training:
        raise ValueError("quantize() needs an inference model: call model.eval() first (int8 is inference-only)")
    dequantize(model)
    enc.requires_grad_(False)  # inference-only from here: a plain model(ids) call needs no torch.no_grad()
    levels, why = int8_support()
    if levels == 0:
        warnings.warn(f"int8 is not available here: {why}; the model stays fp32", RuntimeWarning, stacklevel=2)
        enc.quantization = QuantizationReport(mode, min_cosine, 1.0, "not run", 32, [], _names(enc), note=why)
        return model
    name = "fastdistil/data/calibration.txt" if calibration is None else "the caller's calibration set"
    seqs = token_ids(enc, default_texts() if calibration is None else calibration, tokenizer)
    bs, n = batches(seqs, batch_size), len(seqs)
    step = _progress(show_progress)

    amax: dict = {}  # per GEMM: per-input-channel absmax over the calibration tokens (K,)
    ref = _input_stats(enc, bs, lambda k, x: amax.__setitem__(k, torch.maximum(amax[k], x.abs().amax(0))
                                                                     if k in amax else x.abs().amax(0)))
    smooth = {k: _smooth(a, _module(enc.layers[k[0]], k[1]).weight, alpha) for k, a in amax.items()}
    rows: dict = {}  # per GEMM: absmax of each calibration row after smoothing
    _input_stats(enc, bs, lambda k, x: rows.setdefault(k, []).append((x / smooth[k]).abs().amax(1)))
    mods = {}
    for (li, g), s in smooth.items():
        limit = row_factor * float(torch.cat(rows[(li, g)]).median()) if row_factor else math.inf
        mods[(li, g)] = Int8Linear(_module(enc.layers[li], g), s, levels, limit)
        _replace(enc.layers[li], g, mods[(li, g)])

    cos = F.cosine_similarity(pooled_embeddings(enc, bs).double(), ref.double(), dim=1)  # (N,)
    worst = float(cos.min())
    step(f"all {len(mods)} GEMMs int8: worst-sequence cosine {worst:.5f} on {n} calibration sequences")
    if worst < min_cosine:
        worst = _fall_back(enc, mods, seqs, bs, ref, cos, min_cosine, step)
    enc.quantization = QuantizationReport(
        mode, min_cosine, worst, f"{name} ({n} sequences)", 8 if levels == 255 else 7,
        [_label(k) for k, m in mods.items() if m.int8], [_label(k) for k, m in mods.items() if not m.int8],
        note="" if levels == 255 else why)
    log.info("quantize: %s", enc.quantization)
    return model


def _smooth(amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (ones when alpha = 0)."""
    w = weight.detach().float().abs().amax(0)  # (K,)
    return (amax.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1.0 - alpha)) if alpha else torch.ones_like(w)


def _fall_back(enc, mods, seqs, bs, ref, cos, min_cosine, step) -> float:
    """Keep GEMMs fp32 until the worst calibration sequence reaches min_cosine. A GEMM's sensitivity is how much
    mean (1 - cosine) over the 64 worst sequences drops when it alone goes back to fp32, per FLOP that costs; the
    most sensitive go back first. Each step is checked on the worst sequences, and on the whole set once they pass
    (whose worst sequences then become the next subset). Returns the worst cosine reached on the whole set."""
    def subset(c):
        idx = c.argsort()[:64].tolist()  # the sequences that set the bound
        return batches([seqs[i] for i in idx]), ref[idx]

    def cosines(b, r):
        return F.cosine_similarity(pooled_embeddings(enc, b).double(), r.double(), dim=1)
    sub, sub_ref = subset(cos)
    base, gain = float((1 - cosines(sub, sub_ref)).mean()), {}
    for k, m in mods.items():
        m.int8 = False
        gain[k] = (base - float((1 - cosines(sub, sub_ref)).mean())) / (m.in_features * m.out_features)
        m.int8 = True
    reached = float(cos.min())
    for k in sorted(gain, key=gain.get, reverse=True):
        mods[k].int8 = False
        if float(cosines(sub, sub_ref).min()) < min_cosine:
            step(f"kept {_label(k)} fp32: the worst sequences are still below {min_cosine}")
            continue
        full = cosines(bs, ref)
        reached = float(full.min())
        step(f"kept {_label(k)} fp32: worst-sequence cosine {reached:.5f}")
        if reached >= min_cosine:
            break
        sub, sub_ref = subset(full)
    else:  # every GEMM fp32 (a bound of 1.0 may still not hold exactly): say what the model gives
        reached = float(cosines(bs, ref).min())
    return reached


def _label(key) -> str:
    return f"layer {key[0]} {key[1]}"


def _names(enc) -> list:
    return [_label((li, g)) for li in range(len(enc.layers)) for g in GEMMS]


def _progress(show: bool):
    def step(msg: str) -> None:
        log.info("quantize: %s", msg)
        if show:
            print(f"quantize: {msg}", flush=True)
    return step
