// Fast CPU path of the ops without a projection: post, residual_add_agg, stream expand and the
// standalone Sinkhorn. All are parallel over tokens; per token they stream over C in vectors of
// the math type, converting from and to the storage dtype on the fly.
#include <cstdint>
#include <cstring>

#include "cpu/fast_kernels.hpp"

namespace mhc::cpu_fast {

namespace {

using namespace kernels;

constexpr int64_t kTokenGrain = 16;

// ---- post ----------------------------------------------------------------------------------------
template <class S>
MHC_INLINE void post_forward_range(const PostForward& a, const MhcConfig&, int64_t begin, int64_t end) {
  using M = math_t<S>;
  const int64_t n = a.x.shape[1], C = a.x.shape[2], K = n * C;
  for (int64_t t = begin; t < end; ++t)
    post_token(a.x.ptr<const S>() + t * K, a.y.ptr<const S>() + t * C, a.h_post.ptr<const M>() + t * n,
               a.comb.ptr<const M>() + t * n * n, n, C, a.x_next.ptr<S>() + t * K);
}
MHC_CPU_ENTRIES(post_forward_range, PostForward)

// grad_y = sum_o h_post[o] g[o];  grad_x[i] = sum_o comb[i, o] g[o];
// grad_h_post[o] = <g[o], y>;     grad_comb[i, o] = <x[i], g[o]>   (g = grad_x_next)
template <class S>
MHC_INLINE void post_backward_range(const PostBackward& a, const MhcConfig&, int64_t begin, int64_t end) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  const int64_t n = a.x.shape[1], C = a.x.shape[2], K = n * C;
  for (int64_t t = begin; t < end; ++t) {
    const S* g = a.grad_x_next.ptr<const S>() + t * K;
    const S* x = a.x.ptr<const S>() + t * K;
    const S* y = a.y.ptr<const S>() + t * C;
    const M* h_post = a.h_post.ptr<const M>() + t * n;
    const M* comb = a.comb.ptr<const M>() + t * n * n;
    S* gx = a.grad_x.ptr<S>() + t * K;
    S* gy = a.grad_y.ptr<S>() + t * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      V acc_y = vload(g + c) * h_post[0];
      for (int64_t o = 1; o < n; ++o) acc_y += vload(g + o * C + c) * h_post[o];
      vstore(gy + c, acc_y);
      for (int64_t i = 0; i < n; ++i) {
        V acc = vload(g + c) * comb[i * n];
        for (int64_t o = 1; o < n; ++o) acc += vload(g + o * C + c) * comb[i * n + o];
        vstore(gx + i * C + c, acc);
      }
    }
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
    M* g_h_post = a.grad_h_post.ptr<M>() + t * n;
    M* g_comb = a.grad_comb.ptr<M>() + t * n * n;
    for (int64_t o = 0; o < n; ++o) {
      g_h_post[o] = dot(g + o * C, y, C);
      for (int64_t i = 0; i < n; ++i) g_comb[i * n + o] = dot(x + i * C, g + o * C, C);
    }
  }
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

void post_forward(const PostForward& a, const MhcConfig& cfg, const Context& ctx) {
  const auto kernel = MHC_CPU_PICK(post_forward_range, a.x.dtype);
  parallel_for(a.x.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
}

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

// Sinkhorn on [T, n, n] logits, f32 or f64: the per-matrix functions of fast_kernels.cpp.
void sinkhorn_forward(const SinkhornForward& a, const MhcConfig& cfg, const Context& ctx) {
  const int n = static_cast<int>(a.logits.shape[1]);
  detail::dispatch_storage(a.logits.dtype, [&](auto tag) {
    using M = math_t<decltype(tag)>;  // the front end admits f32 and f64 only
    parallel_for(a.logits.shape[0], 64, ctx, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        sinkhorn_forward_matrix(a.logits.ptr<const M>() + t * n * n, a.comb.ptr<M>() + t * n * n, n, cfg.iters,
                                M(cfg.eps));
    });
  });
}

void sinkhorn_backward(const SinkhornBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const int n = static_cast<int>(a.logits.shape[1]);
  detail::dispatch_storage(a.logits.dtype, [&](auto tag) {
    using M = math_t<decltype(tag)>;
    parallel_for(a.logits.shape[0], 16, ctx, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        sinkhorn_backward_matrix(a.logits.ptr<const M>() + t * n * n, a.grad_comb.ptr<const M>() + t * n * n,
                                 a.grad_logits.ptr<M>() + t * n * n, n, cfg.iters, M(cfg.eps));
    });
  });
}

}  // namespace mhc::cpu_fast
