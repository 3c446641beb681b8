// Fast CPU path of the ops without a projection: post backward, residual_add_agg, stream expand
// and the standalone Sinkhorn (post forward lives with post_pre_forward in fast_site.cpp). All are parallel over tokens; per token they stream over C in vectors of
// the math type, converting from and to the storage dtype on the fly.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/fast_kernels.hpp"

namespace mhc::cpu_fast {

namespace {

using namespace kernels;

constexpr int64_t kTokenGrain = 16;

// ---- post ----------------------------------------------------------------------------------------
// grad_y = sum_o h_post[o] g[o];  grad_x[i] = sum_o comb[i, o] g[o];
// grad_h_post[o] = <g[o], y>;     grad_comb[i, o] = <x[i], g[o]>   (g = grad_x_next)
// One pass over C with every dot product in vector accumulators when n <= kFusedStreams; beyond
// that the n*n dot products run as separate passes over the token's block (in cache).
constexpr int64_t kFusedStreams = 8;

template <class S>
MHC_INLINE void post_backward_token(const S* g, const S* x, const S* y, const math_t<S>* h_post,
                                    const math_t<S>* comb, int64_t n, int64_t C, S* gx, S* gy, math_t<S>* g_h_post,
                                    math_t<S>* g_comb) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  const bool fused = n <= kFusedStreams;
  V acc_h[kFusedStreams], acc_comb[kFusedStreams * kFusedStreams];
  if (fused) {
    for (int64_t o = 0; o < n; ++o) acc_h[o] = V{};
    for (int64_t e = 0; e < n * n; ++e) acc_comb[e] = V{};
  }
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    V gv[kMaxStreams];
    for (int64_t o = 0; o < n; ++o) gv[o] = vload(g + o * C + c);
    V acc_y{};
    for (int64_t o = 0; o < n; ++o) acc_y += gv[o] * h_post[o];
    vstore(gy + c, acc_y);
    for (int64_t i = 0; i < n; ++i) {
      V acc{};
      for (int64_t o = 0; o < n; ++o) acc += gv[o] * comb[i * n + o];
      vstore(gx + i * C + c, acc);
    }
    if (fused) {
      const V yv = vload(y + c);
      for (int64_t o = 0; o < n; ++o) acc_h[o] += gv[o] * yv;
      for (int64_t i = 0; i < n; ++i) {
        const V xv = vload(x + i * C + c);
        for (int64_t o = 0; o < n; ++o) acc_comb[i * n + o] += xv * gv[o];
      }
    }
  }
  const int64_t c_tail = c;
  for (; c < C; ++c) {
    M acc_y = 0;
    for (int64_t o = 0; o < n; ++o) acc_y += h_post[o] * load(g, o * C + c);
    store(gy, c, acc_y);
    for (int64_t i = 0; i < n; ++i) {
      M acc = 0;
      for (int64_t o = 0; o < n; ++o) acc += comb[i * n + o] * load(g, o * C + c);
      store(gx, i * C + c, acc);
    }
  }
  if (fused) {
    for (int64_t o = 0; o < n; ++o) {
      M s = hsum(acc_h[o]);
      for (int64_t cc = c_tail; cc < C; ++cc) s += load(g, o * C + cc) * load(y, cc);
      g_h_post[o] = s;
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < n; ++o) {
        M s = hsum(acc_comb[i * n + o]);
        for (int64_t cc = c_tail; cc < C; ++cc) s += load(x, i * C + cc) * load(g, o * C + cc);
        g_comb[i * n + o] = s;
      }
  } else {
    for (int64_t o = 0; o < n; ++o) {
      g_h_post[o] = dot(g + o * C, y, C);
      for (int64_t i = 0; i < n; ++i) g_comb[i * n + o] = dot(x + i * C, g + o * C, C);
    }
  }
}

template <class S>
MHC_INLINE void post_backward_range(const PostBackward& a, const MhcConfig&, int64_t begin, int64_t end) {
  using M = math_t<S>;
  with_stream_count(a.x.shape[1], [&](int64_t n) MHC_INLINE_LAMBDA {
    const int64_t C = a.x.shape[2], K = n * C;
    for (int64_t t = begin; t < end; ++t)
      post_backward_token(a.grad_x_next.ptr<const S>() + t * K, a.x.ptr<const S>() + t * K,
                          a.y.ptr<const S>() + t * C, a.h_post.ptr<const M>() + t * n,
                          a.comb.ptr<const M>() + t * n * n, n, C, a.grad_x.ptr<S>() + t * K,
                          a.grad_y.ptr<S>() + t * C, a.grad_h_post.ptr<M>() + t * n,
                          a.grad_comb.ptr<M>() + t * n * n);
  });
}
MHC_CPU_ENTRIES(post_backward_range, PostBackward)

// ---- residual_add_agg ----------------------------------------------------------------------------
// agg reads x_out as stored (rounded to the stream dtype), as the unfused ops would.
template <class S>
MHC_INLINE void residual_add_agg_forward_range(const ResidualAddAggForward& a, const MhcConfig&, int64_t begin, int64_t end) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  const int64_t n = a.x.shape[1], C = a.x.shape[2], K = n * C;
  for (int64_t t = begin; t < end; ++t) {
    const S* x = a.x.ptr<const S>() + t * K;
    const S* res = a.res.ptr<const S>() + t * K;
    const M* h = a.h_pre.ptr<const M>() + t * n;
    S* xo = a.x_out.ptr<S>() + t * K;
    S* agg = a.agg.ptr<S>() + t * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      V acc{};
      for (int64_t i = 0; i < n; ++i) {
        vstore(xo + i * C + c, vload(x + i * C + c) + vload(res + i * C + c));
        acc += vload(xo + i * C + c) * h[i];
      }
      vstore(agg + c, acc);
    }
    for (; c < C; ++c) {
      M acc = 0;
      for (int64_t i = 0; i < n; ++i) {
        store(xo, i * C + c, load(x, i * C + c) + load(res, i * C + c));
        acc += h[i] * load(xo, i * C + c);
      }
      store(agg, c, acc);
    }
  }
}
MHC_CPU_ENTRIES(residual_add_agg_forward_range, ResidualAddAggForward)

template <class S>
MHC_INLINE void residual_add_agg_backward_range(const ResidualAddAggBackward& a, const MhcConfig&, int64_t begin,
                                     int64_t end) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  const int64_t n = a.x_out.shape[1], C = a.x_out.shape[2], K = n * C;
  for (int64_t t = begin; t < end; ++t) {
    const S* gxo = a.grad_x_out.present() ? a.grad_x_out.ptr<const S>() + t * K : nullptr;
    const S* gagg = a.grad_agg.present() ? a.grad_agg.ptr<const S>() + t * C : nullptr;
    const S* xo = a.x_out.ptr<const S>() + t * K;
    const M* h = a.h_pre.ptr<const M>() + t * n;
    S* gs = a.grad_sum.ptr<S>() + t * K;
    M* gh = a.grad_h_pre.ptr<M>() + t * n;
    for (int64_t i = 0; i < n; ++i) {
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        V v{};
        if (gxo) v += vload(gxo + i * C + c);
        if (gagg) v += vload(gagg + c) * h[i];
        vstore(gs + i * C + c, v);
      }
      for (; c < C; ++c) {
        M v = 0;
        if (gxo) v += load(gxo, i * C + c);
        if (gagg) v += h[i] * load(gagg, c);
        store(gs, i * C + c, v);
      }
      gh[i] = gagg ? dot(xo + i * C, gagg, C) : M(0);
    }
  }
}
MHC_CPU_ENTRIES(residual_add_agg_backward_range, ResidualAddAggBackward)

// ---- stream expand -------------------------------------------------------------------------------
template <class S>
MHC_INLINE void expand_backward_range(const ExpandBackward& a, const MhcConfig&, int64_t begin, int64_t end) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  const int64_t n = a.grad_out.shape[1], C = a.grad_out.shape[2], K = n * C;
  for (int64_t t = begin; t < end; ++t) {
    const S* g = a.grad_out.ptr<const S>() + t * K;
    S* gx = a.grad_x.ptr<S>() + t * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      V acc = vload(g + c);
      for (int64_t i = 1; i < n; ++i) acc += vload(g + i * C + c);
      vstore(gx + c, acc);
    }
    for (; c < C; ++c) {
      M acc = 0;
      for (int64_t i = 0; i < n; ++i) acc += load(g, i * C + c);
      store(gx, c, acc);
    }
  }
}
MHC_CPU_ENTRIES(expand_backward_range, ExpandBackward)

}  // namespace

void post_backward(const PostBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const auto kernel = MHC_CPU_PICK(post_backward_range, a.x.dtype);
  parallel_for(a.x.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
}

void residual_add_agg_forward(const ResidualAddAggForward& a, const MhcConfig& cfg, const Context& ctx) {
  const auto kernel = MHC_CPU_PICK(residual_add_agg_forward_range, a.x.dtype);
  parallel_for(a.x.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
}

void residual_add_agg_backward(const ResidualAddAggBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const auto kernel = MHC_CPU_PICK(residual_add_agg_backward_range, a.x_out.dtype);
  parallel_for(a.x_out.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
}

// A copy per stream: no arithmetic, so no kernel clones needed.
void expand_forward(const ExpandForward& a, const MhcConfig&, const Context& ctx) {
  const int64_t n = a.out.shape[1], C = a.out.shape[2];
  const std::size_t row = static_cast<std::size_t>(C) * dtype_size(a.x.dtype);
  const auto* x = static_cast<const unsigned char*>(a.x.data);
  auto* out = static_cast<unsigned char*>(a.out.data);
  parallel_for(a.x.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < n; ++i) std::memcpy(out + (t * n + i) * row, x + t * row, row);
  });
}

void expand_backward(const ExpandBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const auto kernel = MHC_CPU_PICK(expand_backward_range, a.grad_out.dtype);
  parallel_for(a.grad_out.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
}

// Sinkhorn on [T, n, n] logits, f32 or f64: kSinkhornBatch tokens at a time in vector lanes when
// n is small, else one matrix at a time.
void sinkhorn_forward(const SinkhornForward& a, const MhcConfig& cfg, const Context& ctx) {
  const int n = static_cast<int>(a.logits.shape[1]), nn = n * n;
  detail::dispatch_storage(a.logits.dtype, [&](auto tag) {
    using M = math_t<decltype(tag)>;  // the front end admits f32 and f64 only
    const M* logits = a.logits.ptr<const M>();
    M* comb = a.comb.ptr<M>();
    parallel_for(a.logits.shape[0], 64, ctx, [&](int64_t t0, int64_t t1) {
      if (n <= kSinkhornBatchMaxN) {
        for (int64_t t = t0; t < t1; t += kSinkhornBatch) {
          const int count = static_cast<int>(std::min<int64_t>(kSinkhornBatch, t1 - t));
          sinkhorn_forward_batch(count, logits + t * nn, nn, comb + t * nn, nn, n, cfg.iters, M(cfg.eps));
        }
      } else {
        for (int64_t t = t0; t < t1; ++t)
          sinkhorn_forward_matrix(logits + t * nn, comb + t * nn, n, cfg.iters, M(cfg.eps));
      }
    });
  });
}

void sinkhorn_backward(const SinkhornBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const int n = static_cast<int>(a.logits.shape[1]), nn = n * n;
  detail::dispatch_storage(a.logits.dtype, [&](auto tag) {
    using M = math_t<decltype(tag)>;
    const M* logits = a.logits.ptr<const M>();
    const M* grad = a.grad_comb.ptr<const M>();
    M* out = a.grad_logits.ptr<M>();
    parallel_for(a.logits.shape[0], 16, ctx, [&](int64_t t0, int64_t t1) {
      if (n <= kSinkhornBatchMaxN) {
        for (int64_t t = t0; t < t1; t += kSinkhornBatch) {
          const int count = static_cast<int>(std::min<int64_t>(kSinkhornBatch, t1 - t));
          sinkhorn_backward_batch(count, logits + t * nn, nn, grad + t * nn, nn, out + t * nn, nn, n, cfg.iters,
                                  M(cfg.eps));
        }
      } else {
        for (int64_t t = t0; t < t1; ++t)
          sinkhorn_backward_matrix(logits + t * nn, grad + t * nn, out + t * nn, n, cfg.iters, M(cfg.eps));
      }
    });
  });
}

}  // namespace mhc::cpu_fast
