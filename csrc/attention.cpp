// Variable-length attention over packed tokens: one task per (sequence, head), scheduled longest-first onto
// torch's intra-op threads (a sequence's cost grows as L^2, so contiguous chunks of tasks would be unbalanced).
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>

#include "ops.h"

namespace fd {
namespace {

struct Schedule {
  std::vector<int64_t> order;  // tasks (b * H + h), grouped by thread
  std::vector<int64_t> start;  // thread t runs order[start[t] .. start[t + 1])
};

// Longest-processing-time-first assignment of the B x H tasks to `nt` threads (cost ~ Lq Lk + Lq + Lk);
// sequences with no query or no key are left out (the caller pre-fills their outputs).
Schedule schedule(const int64_t* cq, const int64_t* ck, int64_t B, int64_t H, int64_t nt) {
  std::vector<double> cost(B);
  for (int64_t s = 0; s < B; ++s) {
    const double lq = static_cast<double>(cq[s + 1] - cq[s]), lk = static_cast<double>(ck[s + 1] - ck[s]);
    cost[s] = (lq == 0 || lk == 0) ? 0.0 : lq * lk + 8.0 * (lq + lk);
  }
  std::vector<int64_t> seqs(B);
  std::iota(seqs.begin(), seqs.end(), 0);
  std::stable_sort(seqs.begin(), seqs.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<std::vector<int64_t>> bins(nt);
  std::vector<double> load(nt, 0.0);
  for (int64_t s : seqs) {
    if (cost[s] == 0.0) continue;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
      bins[t].push_back(s * H + h);
      load[t] += cost[s];
    }
  }
  Schedule sc;
  sc.start.push_back(0);
  for (auto& b : bins) {
    sc.order.insert(sc.order.end(), b.begin(), b.end());
    sc.start.push_back(static_cast<int64_t>(sc.order.size()));
  }
  return sc;
}

// cu_seqlens as int64 on the host, validated: starts at 0, non-decreasing, ends at T; and the longest length,
// which sizes the scratch buffers (never the caller's max_seqlen: 2**62 there wrapped the size to a few bytes).
// max_seqlen must lie between the longest length and T, the rule of the public op (ops/checks.py).
std::vector<int64_t> host_cu(const Tensor& cu_seqlens, int64_t T, int64_t max_seqlen, const char* name,
                             int64_t* longest) {
  check_cpu(cu_seqlens, name);
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, "fastdistil native: ", name,
                    " must be (B+1,), got ", cu_seqlens.sizes());
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
                   "fastdistil native: ", name, " must be int32 or int64, got ", cu_seqlens.scalar_type());
  Tensor c = cu_seqlens.to(at::kLong).contiguous();
  std::vector<int64_t> cu(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  TORCH_CHECK_VALUE(cu.front() == 0, "fastdistil native: ", name, "[0] must be 0, got ", cu.front());
  TORCH_CHECK_VALUE(cu.back() == T, "fastdistil native: ", name, "[-1] must equal the number of tokens ", T, ", got ",
                    cu.back());
  int64_t lmax = 0;
  for (size_t i = 1; i < cu.size(); ++i) {
    TORCH_CHECK_VALUE(cu[i] >= cu[i - 1], "fastdistil native: ", name, " must be non-decreasing, got ", cu[i - 1],
                      " then ", cu[i], " at index ", i);
    lmax = std::max(lmax, cu[i] - cu[i - 1]);
  }
  TORCH_CHECK_VALUE(lmax <= max_seqlen && max_seqlen <= T, "fastdistil native: max_seqlen must lie between the ",
                    "longest sequence (", lmax, ") and the token count (", T, "), got ", max_seqlen);
  *longest = lmax;
  return cu;
}

void check_qkv(const Tensor& t, const char* name, const Tensor& q, bool same_tokens = true) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(2) > 0, "fastdistil native: ", name, " must be (T, H, D) with D > 0, got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.size(1) == q.size(1) && t.size(2) == q.size(2) && (!same_tokens || t.size(0) == q.size(0)),
                    "fastdistil native: ", name, " has shape ", t.sizes(), ", q has ", q.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "fastdistil native: ", name, " must have q's dtype ",
                   q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.stride(2) == 1 || t.size(2) == 1, "fastdistil native: ", name,
                    " must be contiguous in its last (head) dimension, got strides ", t.strides());
}

// Run `fn(task, work)` over every (sequence, head) with a per-thread scratch buffer of `work_floats`.
template <typename F>
void for_each_task(const std::vector<int64_t>& cq, const std::vector<int64_t>& ck, int64_t H, size_t work_floats,
                   F fn) {
  TORCH_CHECK_VALUE(cq.size() == ck.size(), "fastdistil native: cu_seqlens and cu_seqlens_k must have one length");
  const int64_t B = static_cast<int64_t>(cq.size()) - 1;
  // Small problems (a batch-1 request) stay on the calling thread: a parallel region costs more than it saves,
  // and on a shared machine waking a second thread can cost a scheduler slice.
  double flops = 0.0;
  for (int64_t b = 0; b < B; ++b)
    flops += 4.0 * static_cast<double>(cq[b + 1] - cq[b]) * static_cast<double>(ck[b + 1] - ck[b]) * H;
  const int64_t nt = flops < 2.0e5 ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * H));
  const Schedule sc = schedule(cq.data(), ck.data(), B, H, nt);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> work(work_floats);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = sc.start[t]; i < sc.start[t + 1]; ++i) fn(sc.order[i], work.data());
  });
}

}  // namespace

std::vector<Tensor> varlen_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                         int64_t max_seqlen, double scale, double dropout_p, int64_t seed,
                                         bool need_lse, const OptTensor& cu_seqlens_k, int64_t max_seqlen_k) {
  const int dt = dtype_index(q, "q");
  const bool cross = cu_seqlens_k.has_value();
  check_qkv(q, "q", q);
  check_qkv(k, "k", q, !cross);
  check_qkv(v, "v", k);
  const int64_t Tq = q.size(0), Tk = k.size(0), H = q.size(1), D = q.size(2);
  int64_t max_q = 0, max_k = 0;
  const auto cq = host_cu(cu_seqlens, Tq, max_seqlen, "cu_seqlens", &max_q);
  const auto ck = cross ? host_cu(*cu_seqlens_k, Tk, max_seqlen_k, "cu_seqlens_k", &max_k) : cq;
  if (!cross) max_k = max_q;
  const uint32_t thr = threshold_of(dropout_p);
  // With separate key lengths a query may have no key: its output is zeros and its lse -inf.
  Tensor o = cross ? at::zeros({Tq, H, D}, q.options()) : at::empty({Tq, H, D}, q.options());
  Tensor lse;
  if (need_lse) lse = cross ? at::full({Tq, H}, -INFINITY, q.options().dtype(at::kFloat))
                            : at::empty({Tq, H}, q.options().dtype(at::kFloat));
  if (Tq == 0 || Tk == 0) return {o, lse};
  const size_t esz = q.element_size();
  const char* qp = static_cast<const char*>(q.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* op = static_cast<char*>(o.data_ptr());
  float* lp = need_lse ? lse.data_ptr<float>() : nullptr;
  const auto kernel = kernels().attn_fwd[dt];
  const float inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  for_each_task(cq, ck, H, attn_fwd_work(max_k, D), [&](int64_t task, float* work) {
    const int64_t b = task / H, h = task % H, q0 = cq[b], k0 = ck[b];
    AttnFwdArgs a;
    a.q = qp + (q0 * q.stride(0) + h * q.stride(1)) * esz;
    a.k = kp + (k0 * k.stride(0) + h * k.stride(1)) * esz;
    a.v = vp + (k0 * v.stride(0) + h * v.stride(1)) * esz;
    a.o = op + ((q0 * H + h) * D) * esz;
    a.lse = lp ? lp + q0 * H + h : nullptr;
    a.sq = q.stride(0), a.sk = k.stride(0), a.sv = v.stride(0), a.so = H * D, a.slse = H;
    a.Lq = cq[b + 1] - q0, a.L = ck[b + 1] - k0, a.D = D, a.scale = static_cast<float>(scale);
    a.drop_key = thr ? stream_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(task)) : 0u;
    a.drop_threshold = thr, a.inv_keep = inv_keep, a.work = work;
    kernel(a);
  });
  return {o, lse};
}

std::vector<Tensor> varlen_attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& o, const Tensor& lse, const Tensor& cu_seqlens,
                                         int64_t max_seqlen, double scale, double dropout_p, int64_t seed,
                                         const OptTensor& cu_seqlens_k, int64_t max_seqlen_k) {
  const int dt = dtype_index(q, "q");
  const bool cross = cu_seqlens_k.has_value();
  check_qkv(q, "q", q);
  check_qkv(k, "k", q, !cross);
  check_qkv(v, "v", k);
  check_qkv(o, "o", q);
  check_qkv(dout, "dout", q);
  const int64_t Tq = q.size(0), Tk = k.size(0), H = q.size(1), D = q.size(2);
  check_cpu(lse, "lse");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == Tq && lse.size(1) == H &&
                        lse.is_contiguous(),
                    "fastdistil native: lse must be a contiguous float32 (T, H) tensor, got ", lse.scalar_type(), " ",
                    lse.sizes(), " with strides ", lse.strides());
  int64_t max_q = 0, max_k = 0;
  const auto cq = host_cu(cu_seqlens, Tq, max_seqlen, "cu_seqlens", &max_q);
  const auto ck = cross ? host_cu(*cu_seqlens_k, Tk, max_seqlen_k, "cu_seqlens_k", &max_k) : cq;
  if (!cross) max_k = max_q;
  const uint32_t thr = threshold_of(dropout_p);
  auto make = [&](int64_t T) { return cross ? at::zeros({T, H, D}, q.options()) : at::empty({T, H, D}, q.options()); };
  Tensor dq = make(Tq), dk = make(Tk), dv = make(Tk);
  if (Tq == 0 || Tk == 0) return {dq, dk, dv};
  const size_t esz = q.element_size();
  auto ptr = [&](const Tensor& t, int64_t s0, int64_t h) {
    return static_cast<char*>(t.data_ptr()) + (s0 * t.stride(0) + h * t.stride(1)) * esz;
  };
  const auto kernel = kernels().attn_bwd[dt];
  const float inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  const float* lp = lse.data_ptr<float>();
  for_each_task(cq, ck, H, attn_bwd_work(max_k, D), [&](int64_t task, float* work) {
    const int64_t b = task / H, h = task % H, q0 = cq[b], k0 = ck[b];
    AttnBwdArgs a;
    a.q = ptr(q, q0, h), a.k = ptr(k, k0, h), a.v = ptr(v, k0, h), a.o = ptr(o, q0, h), a.dout = ptr(dout, q0, h);
    a.lse = lp + q0 * H + h;
    a.dq = ptr(dq, q0, h), a.dk = ptr(dk, k0, h), a.dv = ptr(dv, k0, h);
    a.sq = q.stride(0), a.sk = k.stride(0), a.sv = v.stride(0), a.so = o.stride(0), a.sdo = dout.stride(0);
    a.sdq = a.sdk = a.sdv = H * D, a.slse = H;
    a.Lq = cq[b + 1] - q0, a.L = ck[b + 1] - k0, a.D = D, a.scale = static_cast<float>(scale);
    a.drop_key = thr ? stream_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(task)) : 0u;
    a.drop_threshold = thr, a.inv_keep = inv_keep, a.work = work;
    kernel(a);
  });
  return {dq, dk, dv};
}

std::vector<int64_t> check_cu_seqlens(const Tensor& cu_seqlens, int64_t T, int64_t max_seqlen, int64_t* longest) {
  return host_cu(cu_seqlens, T, max_seqlen, "cu_seqlens", longest);
}

// Inference: attention straight from the fused QKV GEMM output (T, 3 * H * D) into out (T, H * D).
void attention_into(const Tensor& qkv, Tensor& out, const Tensor& cu_seqlens, int64_t n_head, int64_t max_seqlen) {
  const int64_t D = qkv.size(1) / 3 / n_head;
  int64_t longest = 0;
  const auto cu = host_cu(cu_seqlens, qkv.size(0), max_seqlen, "cu_seqlens", &longest);
  attention_into(qkv, out, cu, longest, n_head, 1.0f / std::sqrt(static_cast<float>(D)));
}

void attention_into(const Tensor& qkv, Tensor& out, const std::vector<int64_t>& cu, int64_t longest, int64_t n_head,
                    float scale) {
  const int dt = dtype_index(qkv, "qkv");
  const int64_t T = qkv.size(0), d = qkv.size(1) / 3, H = n_head, D = d / H;
  if (T == 0) return;
  const size_t esz = qkv.element_size();
  const char* base = static_cast<const char*>(qkv.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const auto kernel = kernels().attn_fwd[dt];
  for_each_task(cu, cu, H, attn_fwd_work(longest, D), [&](int64_t task, float* work) {
    const int64_t b = task / H, h = task % H, s0 = cu[b];
    AttnFwdArgs a;
    a.Lq = cu[b + 1] - s0;
    a.q = base + (s0 * 3 * d + h * D) * esz;
    a.k = base + (s0 * 3 * d + d + h * D) * esz;
    a.v = base + (s0 * 3 * d + 2 * d + h * D) * esz;
    a.o = op + (s0 * d + h * D) * esz;
    a.lse = nullptr;
    a.sq = a.sk = a.sv = 3 * d, a.so = d, a.slse = 0;
    a.L = cu[b + 1] - s0, a.D = D, a.scale = scale;
    a.drop_key = 0, a.drop_threshold = 0, a.inv_keep = 1.0f, a.work = work;
    kernel(a);
  });
}

// The keep mask (rows x cols, scaled 0 or 1/(1-p)) that attention stream `stream` = b * H + h uses for seed.
Tensor dropout_keep_mask(int64_t seed, int64_t stream, int64_t rows, int64_t cols, double p) {
  const uint32_t thr = threshold_of(p);
  mul_checked(rows, cols);  // rows, cols >= 0 and their product fits
  Tensor m = at::empty({rows, cols}, at::kFloat);
  float* mp = m.data_ptr<float>();
  const uint32_t key = stream_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(stream));
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  for (int64_t i = 0; i < rows * cols; ++i)
    mp[i] = thr ? keep_scale(key, static_cast<uint32_t>(i), thr, inv_keep) : 1.0f;
  return m;
}

}  // namespace fd
