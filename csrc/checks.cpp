// Argument checks shared by the torch-facing entry points.
#include "ops.h"

namespace fd {

// Every tensor argument passes here before its data pointer is read: a meta, CUDA or sparse tensor has no CPU
// memory behind data_ptr() (reading it segfaulted).
void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "fastdistil native: ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastdistil native: ", name, " must be a CPU tensor, got one on ",
                    t.device());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fastdistil native: ", name, " must be a dense (strided) tensor, got ",
                    t.layout());
}

int dtype_index(const Tensor& t, const char* name) {
  check_cpu(t, name);
  if (t.scalar_type() == at::kFloat) return kF32;
  if (t.scalar_type() == at::kBFloat16) return kBF16;
  TORCH_CHECK_TYPE(false, "fastdistil native: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  return -1;
}

void check_like(const Tensor& t, const char* name, const Tensor& x) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "fastdistil native: ", name, " must have dtype ",
                   x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "fastdistil native: ", name, " has shape ", t.sizes(), ", expected ",
                    x.sizes());
}

int64_t mul_checked(int64_t a, int64_t b) {
  int64_t r;
  TORCH_CHECK_VALUE(a >= 0 && b >= 0, "fastdistil native: sizes must be >= 0, got ", a, " x ", b);
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &r), "fastdistil native: a buffer size overflows int64 (", a,
                    " x ", b, ")");
  return r;
}

uint32_t threshold_of(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "fastdistil native: dropout_p must be in [0, 1), got ", p);
  return p > 0.0 ? drop_threshold(static_cast<float>(p)) : 0u;
}

Tensor param_like(const Tensor& p, const Tensor& x, const char* name, int64_t n) {
  check_cpu(p, name);
  TORCH_CHECK_TYPE(p.is_floating_point(), "fastdistil native: ", name, " must be a floating tensor, got ",
                   p.scalar_type());
  TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == n, "fastdistil native: ", name, " must have shape (", n, "), got ",
                    p.sizes());
  Tensor out = p.scalar_type() == x.scalar_type() ? p : p.to(x.scalar_type());
  return out.contiguous();
}

}  // namespace fd
