// Fused embeddings: LayerNorm(word[ids] + position[pos] + type[tt]) per token, tokens in parallel.
#include <ATen/Parallel.h>

#include "ops.h"

namespace fd {

Tensor embed_layer_norm_fwd(const Tensor& ids, const Tensor& type_ids, const Tensor& pos_ids, const Tensor& word,
                            const Tensor& pos, const Tensor& type, const Tensor& weight, const Tensor& bias,
                            double eps) {
  const int dt = dtype_index(word, "word_weight");
  check_cpu(pos, "position_weight");
  check_cpu(type, "type_weight");
  TORCH_CHECK_VALUE(word.dim() == 2 && pos.dim() == 2 && type.dim() == 2 && pos.size(1) == word.size(1) &&
                        type.size(1) == word.size(1),
                    "fastdistil native: embedding tables must be (rows, N) with one N, got ", word.sizes(), ", ",
                    pos.sizes(), ", ", type.sizes());
  TORCH_CHECK_TYPE(pos.scalar_type() == word.scalar_type() && type.scalar_type() == word.scalar_type(),
                   "fastdistil native: embedding tables must share a dtype, got ", word.scalar_type(), ", ",
                   pos.scalar_type(), ", ", type.scalar_type());
  const char* names[] = {"input_ids", "token_type_ids", "position_ids"};
  int i = 0;
  for (const Tensor* t : {&ids, &type_ids, &pos_ids}) {
    check_cpu(*t, names[i]);
    TORCH_CHECK_TYPE(at::isIntegralType(t->scalar_type(), /*includeBool=*/false), "fastdistil native: ", names[i],
                     " must be an integer tensor, got ", t->scalar_type());
    ++i;
  }
  TORCH_CHECK_VALUE(ids.sizes() == type_ids.sizes() && ids.sizes() == pos_ids.sizes(),
                    "fastdistil native: input_ids, token_type_ids and position_ids must have one shape, got ",
                    ids.sizes(), ", ", type_ids.sizes(), ", ", pos_ids.sizes());
  const int64_t N = word.size(1);
  Tensor w = word.contiguous(), p = pos.contiguous(), ty = type.contiguous();
  Tensor g = param_like(weight, word, "ln_weight", N), b = param_like(bias, word, "ln_bias", N);
  Tensor i64 = ids.to(at::kLong).contiguous().view(-1), t64 = type_ids.to(at::kLong).contiguous().view(-1);
  Tensor p64 = pos_ids.to(at::kLong).contiguous().view(-1);
  const int64_t T = i64.numel();
  // Index range checks guard memory safety (the model checks ranges once per batch with a clearer message).
  const int64_t* ip = i64.data_ptr<int64_t>();
  const int64_t* tp = t64.data_ptr<int64_t>();
  const int64_t* pp = p64.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(ip[t] >= 0 && ip[t] < w.size(0), "fastdistil native: input_ids[", t, "] = ", ip[t],
                      " is out of range [0, ", w.size(0), ")");
    TORCH_CHECK_VALUE(tp[t] >= 0 && tp[t] < ty.size(0), "fastdistil native: token_type_ids[", t, "] = ", tp[t],
                      " is out of range [0, ", ty.size(0), ")");
    TORCH_CHECK_VALUE(pp[t] >= 0 && pp[t] < p.size(0), "fastdistil native: position_ids[", t, "] = ", pp[t],
                      " is out of range [0, ", p.size(0), ")");
  }
  Tensor y = at::empty({T, N}, word.options());
  EmbedArgs a{};
  a.ids = i64.data_ptr<int64_t>(), a.type_ids = t64.data_ptr<int64_t>(), a.pos_ids = p64.data_ptr<int64_t>();
  a.word = w.data_ptr(), a.pos = p.data_ptr(), a.type = ty.data_ptr(), a.gamma = g.data_ptr(), a.beta = b.data_ptr();
  a.y = y.data_ptr(), a.N = N, a.eps = static_cast<float>(eps);
  const auto kernel = kernels().embed_fwd[dt];
  at::parallel_for(0, T, row_grain(N), [&](int64_t r0, int64_t r1) {
    EmbedArgs c = a;
    c.r0 = r0, c.r1 = r1;
    kernel(c);
  });
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(N);
  return y.view(shape);
}

}  // namespace fd
