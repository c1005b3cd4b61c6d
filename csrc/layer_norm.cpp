// Fused LayerNorm: y = LayerNorm(dropout(x + input_bias) + residual), rows in parallel; backward with the
// column reductions (dgamma, dbeta, d input_bias) as per-thread fp32 partial sums.
#include <ATen/Parallel.h>

#include "ops.h"

namespace fd {
namespace {

void check_rows(const Tensor& t, const char* name, const Tensor& x) { check_like(t, name, x); }

// Rows of a (..., N) tensor as a contiguous (R, N) matrix (a copy only when the input is not contiguous).
Tensor as_rows(const Tensor& t, int64_t N) { return t.contiguous().view({-1, N}); }

}  // namespace

std::vector<Tensor> layer_norm_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                                   const OptTensor& residual, const OptTensor& input_bias, double dropout_p,
                                   int64_t seed, bool save) {
  const int dt = dtype_index(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "fastdistil native: x must be (..., N) with N > 0, got ",
                    x.sizes());
  const int64_t N = x.size(-1);
  Tensor xr = as_rows(x, N);
  const int64_t R = xr.size(0);
  Tensor w = param_like(weight, x, "weight", N), b = param_like(bias, x, "bias", N);
  Tensor rr, ib;
  if (residual) {
    check_rows(*residual, "residual", x);
    rr = as_rows(*residual, N);
  }
  if (input_bias) ib = param_like(*input_bias, x, "input_bias", N);
  const uint32_t thr = threshold_of(dropout_p);
  Tensor y = at::empty({R, N}, x.options());
  Tensor s, mean, rstd;
  if (save) {
    s = at::empty({R, N}, x.options());
    mean = at::empty({R}, x.options().dtype(at::kFloat));
    rstd = at::empty({R}, x.options().dtype(at::kFloat));
  }
  LnFwdArgs a{};
  a.x = xr.data_ptr(), a.residual = rr.defined() ? rr.data_ptr() : nullptr;
  a.in_bias = ib.defined() ? ib.data_ptr() : nullptr, a.gamma = w.data_ptr(), a.beta = b.data_ptr();
  a.y = y.data_ptr(), a.sum = save ? s.data_ptr() : nullptr;
  a.mean = save ? mean.data_ptr<float>() : nullptr, a.rstd = save ? rstd.data_ptr<float>() : nullptr;
  a.sx = a.sr = a.sy = a.ss = N, a.N = N, a.eps = static_cast<float>(eps);
  a.drop_key = thr ? stream_key(static_cast<uint64_t>(seed), 0) : 0u, a.drop_threshold = thr;
  a.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  const auto kernel = kernels().ln_fwd[dt];
  at::parallel_for(0, R, row_grain(N), [&](int64_t r0, int64_t r1) {
    LnFwdArgs c = a;
    c.r0 = r0, c.r1 = r1;
    kernel(c);
  });
  y = y.view(x.sizes());
  if (save) s = s.view(x.sizes());
  return {y, s, mean, rstd};
}

std::vector<Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& sum, const Tensor& mean, const Tensor& rstd,
                                   const Tensor& weight, double dropout_p, int64_t seed) {
  const int dt = dtype_index(sum, "sum");
  TORCH_CHECK_VALUE(sum.dim() >= 1 && sum.size(-1) > 0, "fastdistil native: sum must be (..., N) with N > 0, got ",
                    sum.sizes());
  const int64_t N = sum.size(-1);
  check_rows(dy, "dy", sum);
  check_cpu(mean, "mean");
  check_cpu(rstd, "rstd");
  Tensor dyr = as_rows(dy, N), sr = as_rows(sum, N);
  const int64_t R = sr.size(0);
  TORCH_CHECK_VALUE(mean.numel() == R && rstd.numel() == R && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat && mean.is_contiguous() && rstd.is_contiguous(),
              "fastdistil native: mean and rstd must be contiguous float32 with one value per row");
  Tensor w = param_like(weight, sum, "weight", N);
  const uint32_t thr = threshold_of(dropout_p);
  Tensor ds = at::empty({R, N}, sum.options());
  Tensor dx = thr ? at::empty({R, N}, sum.options()) : ds;
  const int64_t grain = row_grain(N);
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (R + grain - 1) / grain));
  Tensor part = at::zeros({nchunks, 3, N}, sum.options().dtype(at::kFloat));
  LnBwdArgs a{};
  a.dy = dyr.data_ptr(), a.sum = sr.data_ptr(), a.gamma = w.data_ptr();
  a.mean = mean.data_ptr<float>(), a.rstd = rstd.data_ptr<float>();
  a.ds = ds.data_ptr(), a.dx = thr ? dx.data_ptr() : nullptr;
  a.sdy = a.ss = a.sds = a.sdx = N, a.N = N;
  a.drop_key = thr ? stream_key(static_cast<uint64_t>(seed), 0) : 0u, a.drop_threshold = thr;
  a.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  const auto kernel = kernels().ln_bwd[dt];
  float* pp = part.data_ptr<float>();
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      LnBwdArgs b = a;
      b.r0 = R * c / nchunks, b.r1 = R * (c + 1) / nchunks;
      b.dgamma = pp + (c * 3 + 0) * N, b.dbeta = pp + (c * 3 + 1) * N, b.dbias = pp + (c * 3 + 2) * N;
      kernel(b);
    }
  });
  Tensor sums = part.sum(0);  // (3, N) fp32
  return {ds.view(sum.sizes()), dx.view(sum.sizes()), sums[0], sums[1], sums[2]};
}

// Inference: y = LayerNorm(x [+ input_bias] + residual) (input_bias may be undefined), all (R, N) contiguous of one dtype, params of that dtype.
void layer_norm_into(const Tensor& x, const Tensor& residual, const Tensor& input_bias, const Tensor& weight,
                     const Tensor& bias, double eps, Tensor& y) {
  const int dt = dtype_index(x, "x");
  const int64_t N = x.size(1), R = x.size(0);
  LnFwdArgs a{};
  a.x = x.data_ptr(), a.residual = residual.data_ptr();
  a.in_bias = input_bias.defined() ? input_bias.data_ptr() : nullptr;
  a.gamma = weight.data_ptr(), a.beta = bias.data_ptr(), a.y = y.data_ptr();
  a.sx = a.sr = a.sy = a.ss = N, a.N = N, a.eps = static_cast<float>(eps), a.inv_keep = 1.0f;
  const auto kernel = kernels().ln_fwd[dt];
  at::parallel_for(0, R, row_grain(N), [&](int64_t r0, int64_t r1) {
    LnFwdArgs c = a;
    c.r0 = r0, c.r1 = r1;
    kernel(c);
  });
}

}  // namespace fd
