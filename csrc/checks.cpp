// Argument checks shared by the torch-facing entry points.
#include "ops.h"

namespace fd {

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastdistil native: ", name, " must be a CPU tensor, got one on ", t.device());
}

int dtype_index(const Tensor& t, const char* name) {
  check_cpu(t, name);
  if (t.scalar_type() == at::kFloat) return kF32;
  if (t.scalar_type() == at::kBFloat16) return kBF16;
  TORCH_CHECK(false, "fastdistil native: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  return -1;
}

uint32_t threshold_of(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastdistil native: dropout_p must be in [0, 1), got ", p);
  return p > 0.0 ? drop_threshold(static_cast<float>(p)) : 0u;
}

Tensor param_like(const Tensor& p, const Tensor& x, const char* name, int64_t n) {
  check_cpu(p, name);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == n, "fastdistil native: ", name, " must have shape (", n, "), got ",
              p.sizes());
  Tensor out = p.scalar_type() == x.scalar_type() ? p : p.to(x.scalar_type());
  return out.contiguous();
}

}  // namespace fd
