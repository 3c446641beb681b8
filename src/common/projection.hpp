// The vector projections of history logits onto the simplex, one row of H values in M precision: softmax and the
// sort-free sparsemax (docs/MATH.md, section 2). Written once for the fast CPU path (src/cpu/history_fast.cpp) and
// the CUDA kernels (src/cuda/history.cu), which compile it for the host and the device; the fp64 reference keeps
// its own plain copy (the oracle stays independent of what it checks).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MHC_HOST_DEVICE __host__ __device__
#else
#define MHC_HOST_DEVICE
#endif

namespace mhc::detail {

template <class M> MHC_HOST_DEVICE inline M exp_of(M v) {
#if defined(__CUDA_ARCH__)
  return exp(v);  // CUDA's device overloads (float and double)
#else
  return std::exp(v);
#endif
}

// s = softmax(u), the maximum subtracted first.
template <class M> MHC_HOST_DEVICE inline void softmax_row(const M* u, M* s, int H) {
  M m = u[0];
  for (int k = 1; k < H; ++k) m = u[k] > m ? u[k] : m;
  M sum = 0;
  for (int k = 0; k < H; ++k) sum += (s[k] = exp_of(u[k] - m));
  const M inv = M(1) / sum;
  for (int k = 0; k < H; ++k) s[k] *= inv;
}

// Sort-free sparsemax: element j is in the support iff 1 + c_j u_j > s_j, where c_j and s_j count and sum the
// elements >= u_j; ties evaluate identically to the sorted formula, and the support size is the largest such c_j.
template <class M> MHC_HOST_DEVICE inline void sparsemax_row(const M* u, M* w, int H) {
  int best_count = 0;
  M best_sum = 0;
  for (int j = 0; j < H; ++j) {
    int count = 0;
    M sum = 0;
    for (int i = 0; i < H; ++i)
      if (u[i] >= u[j]) {
        ++count;
        sum += u[i];
      }
    if (M(1) + count * u[j] > sum && count > best_count) {
      best_count = count;
      best_sum = sum;
    }
  }
  const M tau = (best_sum - M(1)) / best_count;
  for (int k = 0; k < H; ++k) {
    const M d = u[k] - tau;
    w[k] = d < M(0) ? M(0) : d;  // a NaN propagates (as std::max(d, 0) does; fmax would drop it)
  }
}

}  // namespace mhc::detail
