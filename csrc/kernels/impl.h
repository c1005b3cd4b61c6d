// Instantiates every kernel for one instruction set (FD_ISA names the namespace) and builds its table.
// Included only by kernels_generic.cpp, kernels_avx2.cpp and kernels_avx512.cpp.
#pragma once

#include "attention.h"
#include "gelu.h"
#include "norm.h"

namespace fd {
namespace FD_ISA {

const KernelTable& table() {
  static const KernelTable t = {
      FD_ISA_NAME,
      {attn_fwd<float>, attn_fwd<bf16>},
      {attn_bwd<float>, attn_bwd<bf16>},
      {ln_fwd<float>, ln_fwd<bf16>},
      {ln_bwd<float>, ln_bwd<bf16>},
      {gelu_fwd<float>, gelu_fwd<bf16>},
      {gelu_bwd<float>, gelu_bwd<bf16>},
      {embed_fwd<float>, embed_fwd<bf16>},
  };
  return t;
}

}  // namespace FD_ISA
}  // namespace fd
