"""What one layer of the native fp32 forward spends outside its GEMMs, at workload A's shapes (issue 13).

    python benchmarks/native_parts.py [--threads 2] [--workload A]

Times, each alone (median of 30): varlen attention over the workload's sequences (12 heads of 32), the fused
residual + LayerNorm over its tokens, and GELU both ways the encoder may apply it: as the post-op of oneDNN's FFN-in
GEMM (the prepacked matmul with and without it; what the avx512 table uses) and as fastdistil's bias + GELU kernel
(below AVX-512). Six layers run each of these once (LayerNorm twice); the sum, beside the
`gemm-floor-fp32` engine of `fastdistil bench`, bounds the share of the GEMM floor a forward can reach. Nothing is
asserted: the numbers go to PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _median_ms(fn, n: int = 30) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workload", default="A")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastdistil
    from fastdistil import ops
    from fastdistil.bench.workloads import get_workload

    torch.set_num_threads(args.threads)
    lens = torch.tensor(get_workload(args.workload).lengths())
    T, d, f, H = int(lens.sum()), 384, 1536, 12
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(T, 3, H, d // H, generator=g).unbind(1)  # strided views of one fused QKV output
    x, r, h = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
    w_ln, b_ln = torch.randn(d, generator=g), torch.randn(d, generator=g)
    w_in, b_in = torch.randn(f, d, generator=g), torch.randn(f, generator=g)
    with torch.inference_mode(), fastdistil.use_backend("native"):
        att = _median_ms(lambda: ops.varlen_attention(q, k, v, cu, int(lens.max())))
        ln = _median_ms(lambda: ops.layer_norm(h, w_ln, b_ln, 1e-12, r))
        mk = torch.ops.mkldnn
        if hasattr(mk, "_reorder_linear_weight") and torch.backends.mkldnn.is_available():
            pk = mk._reorder_linear_weight(w_in, 32)
            plain = _median_ms(lambda: mk._linear_pointwise(x, pk, b_in, "none", [], ""))
            gelu = _median_ms(lambda: mk._linear_pointwise(x, pk, b_in, "gelu", [], "none")) - plain
        else:
            plain = gelu = float("nan")
        h_in = torch.randn(T, f, generator=g)
        ours = _median_ms(lambda: ops.bias_gelu(h_in, b_in))  # out of place: the encoder's in-place pass costs less
        isa = fastdistil._C.isa()
    used = gelu if isa == "avx512" else ours  # csrc/layer.cpp: oneDNN's post-op on the avx512 table only
    per_layer = att + 2 * ln + used
    print(f"workload {args.workload}: {T} tokens, {len(lens)} sequences, {args.threads} threads, kernel table {isa}")
    print(f"per layer: attention {att:.2f} ms, residual + LayerNorm {ln:.2f} ms (x2), GELU as oneDNN's post-op "
          f"{gelu:.2f} ms (FFN-in GEMM {plain:.2f} ms without it) or fastdistil's kernel {ours:.2f} ms (the encoder "
          f"uses the {'post-op' if isa == 'avx512' else 'kernel'} here): {per_layer:.2f} ms outside the GEMMs, "
          f"{6 * per_layer:.1f} ms for six layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
