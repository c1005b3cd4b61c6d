// int8 helpers of fastdistil/quantize.py, registered as torch ops (torch.ops.fastdistil_int8.*) when the
// extension loads; quantize.py falls back to the same maths in torch ops when they are absent.
//   quantize_rows: per-row asymmetric uint8 of x * inv_smooth, q = trunc((v - min) / s + 0.5), s = (max - min) /
//                  levels (255, or 127 where the CPU's u8 x s8 pairs would saturate int16):
//                  one pass over the input (the row is read twice, the second time from L1/L2) instead of torch's
//                  five (mul, aminmax, addcmul, cast...), which cost more than the int8 GEMM itself.
//   epilogue_:     y = y * s_row + min_row * wsum + b in place on the GEMM's fp32 output (T, N).
// Rows run in parallel (at::parallel_for: torch's thread count). The loops are compiled for AVX-512, AVX2 and
// baseline x86-64 (GCC target_clones, chosen by the loader from the CPU), so the extension loads on any x86-64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FD_CLONES
#endif

FD_CLONES void quantize_rows_range(const float* x, const float* inv, uint8_t* q, float* s, float* lo_out,
                                   float* hi_out, int64_t r0, int64_t r1, int64_t K, float levels) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * K;
    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (int64_t k = 0; k < K; ++k) {
      const float v = xr[k] * inv[k];
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    const float sc = std::max((hi - lo) / levels, 1e-30f);
    const float rs = 1.0f / sc, c = 0.5f - lo * rs;
    uint8_t* qr = q + r * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::min(std::max(xr[k] * inv[k] * rs + c, 0.0f), levels);  // [0.5, levels + 0.5], rounded
      qr[k] = static_cast<uint8_t>(static_cast<int32_t>(v));                      // truncation: round half up
    }
    s[r] = sc, lo_out[r] = lo, hi_out[r] = hi;
  }
}

FD_CLONES void epilogue_range(float* y, const float* s, const float* lo, const float* wsum, const float* b,
                              int64_t r0, int64_t r1, int64_t N) {
  for (int64_t r = r0; r < r1; ++r) {
    float* yr = y + r * N;
    const float sc = s[r], m = lo[r];
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) yr[n] = yr[n] * sc + (m * wsum[n] + b[n]);
  }
}

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(),
                    "fastdistil int8: ", name, " must be a contiguous float32 CPU tensor of ", dim,
                    " dimension(s), got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

int64_t grain(int64_t K) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x,
                                                                         const at::Tensor& inv_smooth, double levels) {
  check_f32(x, "x", 2);
  check_f32(inv_smooth, "inv_smooth", 1);
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(levels >= 1.0 && levels <= 255.0, "fastdistil int8: levels must be in [1, 255], got ", levels);
  TORCH_CHECK_VALUE(inv_smooth.size(0) == K, "fastdistil int8: inv_smooth has ", inv_smooth.size(0),
                    " entries for rows of ", K);
  at::Tensor q = at::empty({T, K}, x.options().dtype(at::kByte));
  at::Tensor s = at::empty({T, 1}, x.options()), lo = at::empty({T, 1}, x.options()),
             hi = at::empty({T, 1}, x.options());
  const float *xp = x.data_ptr<float>(), *ip = inv_smooth.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float *sp = s.data_ptr<float>(), *lp = lo.data_ptr<float>(), *hp = hi.data_ptr<float>();
  at::parallel_for(0, T, grain(K), [&](int64_t r0, int64_t r1) {
    quantize_rows_range(xp, ip, qp, sp, lp, hp, r0, r1, K, static_cast<float>(levels));
  });
  return {q, s, lo, hi};
}

at::Tensor epilogue_(at::Tensor y, const at::Tensor& s, const at::Tensor& lo, const at::Tensor& wsum,
                     const at::Tensor& bias) {
  check_f32(y, "y", 2);
  const int64_t T = y.size(0), N = y.size(1);
  check_f32(wsum, "wsum", 1);
  check_f32(bias, "bias", 1);
  TORCH_CHECK_VALUE(s.numel() == T && lo.numel() == T && wsum.size(0) == N && bias.size(0) == N,
                    "fastdistil int8: epilogue sizes do not match y ", y.sizes());
  check_f32(s, "scale", s.dim());
  check_f32(lo, "min", lo.dim());
  float* yp = y.data_ptr<float>();
  const float *sp = s.data_ptr<float>(), *lp = lo.data_ptr<float>(), *wp = wsum.data_ptr<float>(),
              *bp = bias.data_ptr<float>();
  at::parallel_for(0, T, grain(N), [&](int64_t r0, int64_t r1) { epilogue_range(yp, sp, lp, wp, bp, r0, r1, N); });
  return y;
}

}  // namespace

TORCH_LIBRARY(fastdistil_int8, m) {
  m.def("quantize_rows(Tensor x, Tensor inv_smooth, float levels) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("epilogue_(Tensor(a!) y, Tensor scale, Tensor min, Tensor wsum, Tensor bias) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(fastdistil_int8, CPU, m) {
  m.impl("quantize_rows", &quantize_rows);
  m.impl("epilogue_", &epilogue_);
}
