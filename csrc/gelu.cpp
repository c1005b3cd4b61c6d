// Fused bias + GELU (erf by default, tanh on request), rows in parallel; backward with d bias as per-thread
// fp32 partial sums.
#include <ATen/Parallel.h>

#include "ops.h"

namespace fd {
namespace {

GeluArgs rows_args(const Tensor& x, const Tensor& b, int64_t N, bool tanh_approx) {
  GeluArgs a{};
  a.x = x.data_ptr(), a.bias = b.defined() ? b.data_ptr() : nullptr, a.sx = a.sy = a.sdy = N, a.N = N, a.tanh_approx = tanh_approx;
  return a;
}

// The forward kernel of dtype `dt` over rows [0, R) of `a`, split across threads.
void gelu_rows(const GeluArgs& a, int dt, int64_t R) {
  const auto kernel = kernels().gelu_fwd[dt];
  at::parallel_for(0, R, row_grain(a.N), [&](int64_t r0, int64_t r1) {
    GeluArgs c = a;
    c.r0 = r0, c.r1 = r1;
    kernel(c);
  });
}

}  // namespace

Tensor bias_gelu_fwd(const Tensor& x, const Tensor& bias, bool tanh_approx) {
  const int dt = dtype_index(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "fastdistil native: x must be (..., N) with N > 0, got ",
                    x.sizes());
  const int64_t N = x.size(-1);
  Tensor xr = x.contiguous().view({-1, N});
  Tensor b = param_like(bias, x, "bias", N);
  Tensor y = at::empty_like(xr);
  GeluArgs a = rows_args(xr, b, N, tanh_approx);
  a.y = y.data_ptr();
  gelu_rows(a, dt, xr.size(0));
  return y.view(x.sizes());
}

std::vector<Tensor> bias_gelu_bwd(const Tensor& dy, const Tensor& x, const Tensor& bias, bool tanh_approx) {
  const int dt = dtype_index(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "fastdistil native: x must be (..., N) with N > 0, got ",
                    x.sizes());
  const int64_t N = x.size(-1);
  check_like(dy, "dy", x);
  Tensor xr = x.contiguous().view({-1, N}), dyr = dy.contiguous().view({-1, N});
  const int64_t R = xr.size(0);
  Tensor b = param_like(bias, x, "bias", N);
  Tensor dx = at::empty_like(xr);
  const int64_t grain = row_grain(N);
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (R + grain - 1) / grain));
  Tensor part = at::zeros({nchunks, N}, x.options().dtype(at::kFloat));
  GeluArgs a = rows_args(xr, b, N, tanh_approx);
  a.dy = dyr.data_ptr(), a.y = dx.data_ptr();
  const auto kernel = kernels().gelu_bwd[dt];
  float* pp = part.data_ptr<float>();
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      GeluArgs g = a;
      g.r0 = R * c / nchunks, g.r1 = R * (c + 1) / nchunks, g.dbias = pp + c * N;
      kernel(g);
    }
  });
  return {dx.view(x.sizes()), part.sum(0)};
}

// Inference: x = gelu(x [+ bias]) in place; x (R, N) contiguous, bias (N,) of x's dtype or undefined.
void bias_gelu_inplace(Tensor& x, const Tensor& bias, bool tanh_approx) {
  const int dt = dtype_index(x, "x");
  const int64_t N = x.size(1);
  GeluArgs a = rows_args(x, bias, N, tanh_approx);
  a.y = x.data_ptr();
  gelu_rows(a, dt, x.size(0));
}

}  // namespace fd
