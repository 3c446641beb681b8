// Fast CPU path of the projection sites: pre, post and post fused with the next pre, the head.
//
// Forward, per group of tokens (16 when n <= 8, else 4): one pass over the tokens' [n, C] blocks
// computes the projection x @ fn^T and the sums of squares together (each fn load serves a tile
// of kTokenTile tokens), the coefficients run on the stack and Sinkhorn runs on the whole group in
// vector lanes, and a second pass over the same blocks (now in cache) aggregates layer_input.
//
// Backward, phase 1 (parallel over tokens): d(coefficients) -> d(pre-activations) (Sinkhorn in
// reverse through every iteration, recomputed, a group at a time), written per token to the
// workspace as dz [T, rows] and dP = d(raw projection) [T, rows]; then grad_x in one pass with
// the dP @ fn GEMM fused in.
// Phase 2 (parallel over columns of fn): grad_fn = dP^T @ x, each element summed over tokens in
// order; grad_base and grad_scale reduced over tokens serially from the workspace. Parameter
// gradients therefore do not depend on the thread count.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/fast_kernels.hpp"

namespace mhc::cpu_fast {

namespace {

using namespace kernels;

constexpr int64_t kTokenGrain = 16;  // tokens per parallel chunk: a multiple of every group size

template <class M> M scale_or_zero(const TensorView& scale, int i) {
  return scale.present() ? scale.ptr<const M>()[i] : M(0);
}

// Pre site row r -> its scale: pre [0, n), post [n, 2n), comb [2n, m).
inline int pre_group(int64_t r, int64_t n) { return r < n ? 0 : (r < 2 * n ? 1 : 2); }

// Workspace of a backward: dz [T, rows] then dP [T, rows] (when fn is present), 64-byte aligned.
template <class M> std::size_t workspace_bytes(int64_t T, int64_t rows, bool with_fn) {
  return T == 0 ? 0 : static_cast<std::size_t>(T * rows * (with_fn ? 2 : 1)) * sizeof(M) + 64;
}
template <class M> M* workspace_base(const TensorView& ws) {
  const auto p = reinterpret_cast<std::uintptr_t>(ws.data);
  return reinterpret_cast<M*>((p + 63) & ~std::uintptr_t(63));
}

// ---- pre forward ---------------------------------------------------------------------------------
template <class S> struct PreTileOut {
  using M = math_t<S>;
  S* layer_input;
  M *h_pre, *h_post, *comb, *mixes, *rstd;
};

// Tokens whose coefficients are computed together: a full batch of Sinkhorn lanes when n is small,
// else one projection tile.
inline int64_t group_size(int64_t n) { return n <= kSinkhornBatchMaxN ? kSinkhornBatch : kTokenTile; }
constexpr int64_t kGroupRows = std::max<int64_t>(kSinkhornBatch * (kSinkhornBatchMaxN * (kSinkhornBatchMaxN + 2)),
                                                 kTokenTile * kMaxRows);

// Pre of `tokens` (<= group_size(n)) consecutive tokens starting at token t, whose blocks start at x.
template <class S>
MHC_INLINE void pre_forward_group(const S* x, int tokens, int64_t t, int64_t n, int64_t C, const math_t<S>* fn,
                                  const math_t<S>* base, const math_t<S>* scale, const MhcConfig& cfg,
                                  const PreTileOut<S>& out) {
  using M = math_t<S>;
  const int64_t K = n * C, m = n * n + 2 * n, nn = n * n;
  M raw[kGroupRows], sumsq[kSinkhornBatch];
  M w[kSinkhornBatch][kMaxStreams];
  for (int t0 = 0; t0 < tokens; t0 += kTokenTile)
    project(std::min(kTokenTile, tokens - t0), x + t0 * K, K, fn, m, raw + t0 * m, sumsq + t0);
  for (int tb = 0; tb < tokens; ++tb) {
    const int64_t tt = t + tb;
    const M rstd = M(1) / std::sqrt(sumsq[tb] / M(K) + M(cfg.norm_eps));
    M* mixes = raw + tb * m;
    for (int64_t r = 0; r < m; ++r) mixes[r] = fn ? mixes[r] * rstd : M(0);
    for (int64_t i = 0; i < n; ++i) {
      const M sp = sigmoid(mixes[i] * scale[0] + base[i]);
      const M so = sigmoid(mixes[n + i] * scale[1] + base[n + i]);
      w[tb][i] = sp + M(cfg.pre_eps);
      out.h_pre[tt * n + i] = w[tb][i];
      out.h_post[tt * n + i] = so * M(cfg.post_mult);
    }
    M* logits = out.comb + tt * nn;  // Sinkhorn runs in place
    for (int64_t r = 0; r < nn; ++r) logits[r] = mixes[2 * n + r] * scale[2] + base[2 * n + r];
    if (n > kSinkhornBatchMaxN) sinkhorn_forward_matrix(logits, logits, static_cast<int>(n), cfg.iters, M(cfg.eps));
    if (out.mixes)
      for (int64_t r = 0; r < m; ++r) out.mixes[tt * m + r] = mixes[r];
    if (out.rstd) out.rstd[tt] = rstd;
  }
  if (n <= kSinkhornBatchMaxN)
    sinkhorn_forward_batch(tokens, out.comb + t * nn, nn, out.comb + t * nn, nn, static_cast<int>(n), cfg.iters,
                           M(cfg.eps));
  for (int tb = 0; tb < tokens; ++tb) aggregate_token(x + tb * K, w[tb], n, C, out.layer_input + (t + tb) * C);
}

template <class S>
MHC_INLINE void pre_forward_range(const PreForward& a, const MhcConfig& cfg, int64_t begin, int64_t end) {
  using M = math_t<S>;
  const int64_t n = a.x.shape[1], C = a.x.shape[2];
  const M scale[3] = {scale_or_zero<M>(a.scale, 0), scale_or_zero<M>(a.scale, 1), scale_or_zero<M>(a.scale, 2)};
  const M* fn = a.fn.present() ? a.fn.ptr<const M>() : nullptr;
  const PreTileOut<S> out{a.layer_input.ptr<S>(), a.h_pre.ptr<M>(),
                          a.h_post.ptr<M>(),      a.comb.ptr<M>(),
                          a.mixes.present() ? a.mixes.ptr<M>() : nullptr,
                          a.rstd.present() ? a.rstd.ptr<M>() : nullptr};
  for (int64_t t = begin; t < end; t += group_size(n)) {
    const int tokens = static_cast<int>(std::min(group_size(n), end - t));
    pre_forward_group(a.x.ptr<const S>() + t * n * C, tokens, t, n, C, fn, a.base.ptr<const M>(), scale, cfg, out);
  }
}
MHC_CPU_ENTRIES(pre_forward_range, PreForward)

// ---- post forward: x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i] ----------------------------
template <class S>
MHC_INLINE void post_forward_range(const PostForward& a, const MhcConfig&, int64_t begin, int64_t end) {
  using M = math_t<S>;
  with_stream_count(a.x.shape[1], [&](int64_t n) MHC_INLINE_LAMBDA {
    const int64_t C = a.x.shape[2], K = n * C;
    for (int64_t t = begin; t < end; ++t)
      post_token(a.x.ptr<const S>() + t * K, a.y.ptr<const S>() + t * C, a.h_post.ptr<const M>() + t * n,
                 a.comb.ptr<const M>() + t * n * n, n, C, a.x_next.ptr<S>() + t * K);
  });
}
MHC_CPU_ENTRIES(post_forward_range, PostForward)

// ---- head forward --------------------------------------------------------------------------------
template <class S>
MHC_INLINE void head_forward_range(const HeadForward& a, const MhcConfig& cfg, int64_t begin, int64_t end) {
  using M = math_t<S>;
  const int64_t n = a.x.shape[1], C = a.x.shape[2], K = n * C;
  const M scale = scale_or_zero<M>(a.scale, 0);
  const M* fn = a.fn.present() ? a.fn.ptr<const M>() : nullptr;
  const M* base = a.base.ptr<const M>();
  const S* x = a.x.ptr<const S>();
  M* weights = a.weights.ptr<M>();
  for (int64_t t = begin; t < end; t += kTokenTile) {
    const int tokens = static_cast<int>(std::min<int64_t>(kTokenTile, end - t));
    M raw[kTokenTile * kMaxStreams], sumsq[kTokenTile];
    project(tokens, x + t * K, K, fn, n, raw, sumsq);
    for (int tb = 0; tb < tokens; ++tb) {
      const int64_t tt = t + tb;
      const M rstd = M(1) / std::sqrt(sumsq[tb] / M(K) + M(cfg.norm_eps));
      for (int64_t i = 0; i < n; ++i) {
        const M mix = fn ? raw[tb * n + i] * rstd : M(0);
        weights[tt * n + i] = sigmoid(mix * scale + base[i]) + M(cfg.pre_eps);
        if (a.mixes.present()) a.mixes.ptr<M>()[tt * n + i] = mix;
      }
      if (a.rstd.present()) a.rstd.ptr<M>()[tt] = rstd;
      aggregate_token(x + tt * K, weights + tt * n, n, C, a.out.ptr<S>() + tt * C);
    }
  }
}
MHC_CPU_ENTRIES(head_forward_range, HeadForward)

// ---- backward, phase 1 ---------------------------------------------------------------------------
// Per token: dz (gradient of the pre-activations) and, with fn, dP = dz * scale * rstd and the
// coefficient of x in the rstd term; then grad_x for the tile.
template <class S> struct TokenGrads {
  using M = math_t<S>;
  M w[kSinkhornBatch][kMaxStreams];  // aggregation weights (h_pre or the head's weights)
  M coef[kSinkhornBatch];            // d/dx of rstd, times sum_r dmixes_r * raw_r
};

// grad_x for a group of tokens: a full group of kSinkhornBatch at once, else kTokenTile at a time.
template <class S>
MHC_INLINE void input_grad_group(int tokens, const InputGradArgs<S>& a, const TokenGrads<S>& tg) {
  const int64_t K = a.n * a.C;
  const int tile = tokens == kSinkhornBatch ? kSinkhornBatch : kTokenTile;
  for (int t0 = 0; t0 < tokens; t0 += tile) {
    InputGradArgs<S> args = a;
    args.x += t0 * K;
    if (args.accum) args.accum += t0 * K;
    if (args.g) args.g += t0 * a.C;
    args.w = &tg.w[t0][0];
    args.coef = tg.coef + t0;
    args.dP += t0 * a.rows;
    args.out += t0 * K;
    input_grad(std::min(tile, tokens - t0), args);
  }
}

// From dz of one token: dP row and the rstd coefficient.
template <class M>
MHC_INLINE M projection_grads(const M* dz, const M* mixes, M rstd, const M* scale_of_row, int64_t rows,
                              int64_t K, M* dP) {
  M dmix_dot_mix = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const M dmix = dz[r] * scale_of_row[r];
    dP[r] = dmix * rstd;
    dmix_dot_mix += dmix * mixes[r];
  }
  // rstd = (sum(x^2)/K + eps)^-1/2: d rstd/dx = -rstd^3 x / K, and sum_r dmix_r raw_r = <dmix, mixes> / rstd.
  return -dmix_dot_mix * rstd * rstd / M(K);
}

template <class S>
MHC_INLINE void pre_backward_range(const PreBackward& a, const MhcConfig& cfg, int64_t begin, int64_t end) {
  using M = math_t<S>;
  const int64_t T = a.x.shape[0], n = a.x.shape[1], C = a.x.shape[2], K = n * C, m = n * n + 2 * n;
  const bool with_fn = a.fn.present();
  const M s[3] = {scale_or_zero<M>(a.scale, 0), scale_or_zero<M>(a.scale, 1), scale_or_zero<M>(a.scale, 2)};
  M scale_of_row[kMaxRows];
  for (int64_t r = 0; r < m; ++r) scale_of_row[r] = s[pre_group(r, n)];
  const M* base = a.base.ptr<const M>();
  const S* x = a.x.ptr<const S>();
  const S* gli = a.grad_layer_input.present() ? a.grad_layer_input.ptr<const S>() : nullptr;
  const M* g_h_pre = a.grad_h_pre.present() ? a.grad_h_pre.ptr<const M>() : nullptr;
  const M* g_h_post = a.grad_h_post.present() ? a.grad_h_post.ptr<const M>() : nullptr;
  const M* g_comb = a.grad_comb.present() ? a.grad_comb.ptr<const M>() : nullptr;
  M* dz_all = workspace_base<M>(a.workspace);
  M* dP_all = dz_all + T * m;
  const int64_t nn = n * n;
  TokenGrads<S> tg;
  for (int64_t t = begin; t < end; t += group_size(n)) {
    const int tokens = static_cast<int>(std::min(group_size(n), end - t));
    M logits[kMaxStreams * kMaxStreams];  // a group's [tokens, n, n] when batched, else one token's
    for (int tb = 0; tb < tokens; ++tb) {
      const int64_t tt = t + tb;
      const M* mixes = a.mixes.ptr<const M>() + tt * m;
      M* dz = dz_all + tt * m;
      for (int64_t i = 0; i < n; ++i) {
        const M sp = sigmoid(mixes[i] * s[0] + base[i]);
        const M so = sigmoid(mixes[n + i] * s[1] + base[n + i]);
        M dh = g_h_pre ? g_h_pre[tt * n + i] : M(0);
        if (gli) dh += dot(x + tt * K + i * C, gli + tt * C, C);
        tg.w[tb][i] = sp + M(cfg.pre_eps);
        dz[i] = dh * sp * (M(1) - sp);
        dz[n + i] = (g_h_post ? g_h_post[tt * n + i] : M(0)) * M(cfg.post_mult) * so * (M(1) - so);
      }
      if (g_comb) {
        M* l = n <= kSinkhornBatchMaxN ? logits + tb * nn : logits;
        for (int64_t r = 0; r < nn; ++r) l[r] = mixes[2 * n + r] * s[2] + base[2 * n + r];
        if (n > kSinkhornBatchMaxN)
          sinkhorn_backward_matrix(l, g_comb + tt * nn, dz + 2 * n, static_cast<int>(n), cfg.iters, M(cfg.eps));
      } else {
        for (int64_t r = 0; r < nn; ++r) dz[2 * n + r] = 0;
      }
    }
    if (g_comb && n <= kSinkhornBatchMaxN)
      sinkhorn_backward_batch(tokens, logits, nn, g_comb + t * nn, nn, dz_all + t * m + 2 * n, m,
                              static_cast<int>(n), cfg.iters, M(cfg.eps));
    for (int tb = 0; tb < tokens; ++tb) {
      const int64_t tt = t + tb;
      tg.coef[tb] = with_fn ? projection_grads(dz_all + tt * m, a.mixes.ptr<const M>() + tt * m,
                                               a.rstd.ptr<const M>()[tt], scale_of_row, m, K, dP_all + tt * m)
                            : M(0);
    }
    input_grad_group(tokens, InputGradArgs<S>{x + t * K,
                                              a.grad_x_accum.present() ? a.grad_x_accum.ptr<const S>() + t * K : nullptr,
                                              gli ? gli + t * C : nullptr, nullptr, nullptr, dP_all + t * m,
                                              with_fn ? a.fn.ptr<const M>() : nullptr, a.grad_x.ptr<S>() + t * K, n,
                                              C, m},
                     tg);
  }
}
MHC_CPU_ENTRIES(pre_backward_range, PreBackward)

template <class S>
MHC_INLINE void head_backward_range(const HeadBackward& a, const MhcConfig& cfg, int64_t begin, int64_t end) {
  using M = math_t<S>;
  const int64_t T = a.x.shape[0], n = a.x.shape[1], C = a.x.shape[2], K = n * C;
  const bool with_fn = a.fn.present();
  M scale_of_row[kMaxStreams];
  for (int64_t r = 0; r < n; ++r) scale_of_row[r] = scale_or_zero<M>(a.scale, 0);
  const M* base = a.base.ptr<const M>();
  const S* x = a.x.ptr<const S>();
  const S* go = a.grad_out.present() ? a.grad_out.ptr<const S>() : nullptr;
  const M* gw = a.grad_weights.present() ? a.grad_weights.ptr<const M>() : nullptr;
  M* dz_all = workspace_base<M>(a.workspace);
  M* dP_all = dz_all + T * n;
  TokenGrads<S> tg;
  for (int64_t t = begin; t < end; t += kTokenTile) {
    const int tokens = static_cast<int>(std::min<int64_t>(kTokenTile, end - t));
    for (int tb = 0; tb < tokens; ++tb) {
      const int64_t tt = t + tb;
      const M* mixes = a.mixes.ptr<const M>() + tt * n;
      M* dz = dz_all + tt * n;
      for (int64_t i = 0; i < n; ++i) {
        const M sig = sigmoid(mixes[i] * scale_of_row[0] + base[i]);
        M dw = gw ? gw[tt * n + i] : M(0);
        if (go) dw += dot(x + tt * K + i * C, go + tt * C, C);
        tg.w[tb][i] = sig + M(cfg.pre_eps);
        dz[i] = dw * sig * (M(1) - sig);
      }
      tg.coef[tb] = with_fn ? projection_grads(dz, mixes, a.rstd.ptr<const M>()[tt], scale_of_row, n, K,
                                               dP_all + tt * n)
                            : M(0);
    }
    input_grad_group(tokens, InputGradArgs<S>{x + t * K, nullptr, go ? go + t * C : nullptr, nullptr, nullptr,
                                              dP_all + t * n, with_fn ? a.fn.ptr<const M>() : nullptr,
                                              a.grad_x.ptr<S>() + t * K, n, C, n},
                     tg);
  }
}
MHC_CPU_ENTRIES(head_backward_range, HeadBackward)

// grad_fn (when present), grad_base and grad_scale from the phase-1 workspace.
template <class M>
void reduce_param_grads(const TensorView& x, const TensorView& mixes, int64_t rows, int (*group)(int64_t, int64_t),
                        const M* dz, const M* dP, const TensorView& grad_fn, const TensorView& grad_base,
                        const TensorView& grad_scale, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = x.shape[0], n = x.shape[1], K = n * x.shape[2];
  if (grad_fn.present()) {  // phase 2, parallel over column blocks of grad_fn
    const int64_t width = param_grad_block_width(x.dtype);
    parallel_for((K + width - 1) / width, 1, ctx, [&](int64_t b0, int64_t b1) {
      detail::dispatch_storage(x.dtype, [&](auto tag) {
        using S = decltype(tag);
        if constexpr (std::is_same_v<math_t<S>, M>)
          param_grad(x.ptr<const S>(), T, K, dP, rows, b0, b1, grad_fn.ptr<M>());
      });
    });
  }
  // Serial in token order, accumulated in fp64: cheap (T * rows) and independent of threads.
  double base_acc[kMaxRows] = {}, scale_acc[3] = {};
  const M* mx = T > 0 ? mixes.ptr<const M>() : nullptr;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      base_acc[r] += dz[t * rows + r];
      scale_acc[group(r, n)] += double(dz[t * rows + r]) * mx[t * rows + r];
    }
  for (int64_t r = 0; r < rows; ++r) grad_base.ptr<M>()[r] = static_cast<M>(base_acc[r]);
  if (grad_scale.present())
    for (int64_t g = 0; g < grad_scale.shape[0]; ++g) grad_scale.ptr<M>()[g] = static_cast<M>(scale_acc[g]);
}

int head_group(int64_t, int64_t) { return 0; }

}  // namespace

// ---- ops ---------------------------------------------------------------------------------------------
void pre_forward(const PreForward& a, const MhcConfig& cfg, const Context& ctx) {
  const auto kernel = MHC_CPU_PICK(pre_forward_range, a.x.dtype);
  parallel_for(a.x.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
}

void post_forward(const PostForward& a, const MhcConfig& cfg, const Context& ctx) {
  const auto kernel = MHC_CPU_PICK(post_forward_range, a.x.dtype);
  parallel_for(a.x.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
}

// Post of this site then pre of the next, one group of tokens at a time so the pre reads x_next
// (as stored, rounded to the stream dtype) while it is still in cache. Both halves call the entry
// points of post_forward and pre_forward, so the result is bitwise that of the two ops in turn.
void post_pre_forward(const PostPreForward& a, const MhcConfig& cfg, const Context& ctx) {
  const auto post = MHC_CPU_PICK(post_forward_range, a.x.dtype);
  const auto pre = MHC_CPU_PICK(pre_forward_range, a.x.dtype);
  const PostForward post_args{a.x, a.y, a.h_post, a.comb, a.x_next};
  const PreForward pre_args{a.x_next, a.fn, a.base, a.scale, a.layer_input, a.h_pre, a.h_post_next, a.comb_next,
                            a.mixes, a.rstd, TensorView::absent()};
  const int64_t group = group_size(a.x.shape[1]);
  parallel_for(a.x.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t += group) {
      post(post_args, cfg, t, std::min(t1, t + group));
      pre(pre_args, cfg, t, std::min(t1, t + group));
    }
  });
}

void head_forward(const HeadForward& a, const MhcConfig& cfg, const Context& ctx) {
  const auto kernel = MHC_CPU_PICK(head_forward_range, a.x.dtype);
  parallel_for(a.x.shape[0], kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
}

std::size_t pre_forward_workspace_bytes(const PreForward&, const MhcConfig&, const Context&) { return 0; }
std::size_t post_pre_forward_workspace_bytes(const PostPreForward&, const MhcConfig&, const Context&) { return 0; }

std::size_t pre_backward_workspace_bytes(const PreBackward& a, const MhcConfig&, const Context&) {
  const int64_t n = a.x.shape[1];
  return a.x.dtype == DType::f64 ? workspace_bytes<double>(a.x.shape[0], n * n + 2 * n, a.fn.present())
                                 : workspace_bytes<float>(a.x.shape[0], n * n + 2 * n, a.fn.present());
}

std::size_t head_backward_workspace_bytes(const HeadBackward& a, const MhcConfig&, const Context&) {
  return a.x.dtype == DType::f64 ? workspace_bytes<double>(a.x.shape[0], a.x.shape[1], a.fn.present())
                                 : workspace_bytes<float>(a.x.shape[0], a.x.shape[1], a.fn.present());
}

void pre_backward(const PreBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.x.shape[0], n = a.x.shape[1], m = n * n + 2 * n;
  const auto kernel = MHC_CPU_PICK(pre_backward_range, a.x.dtype);
  parallel_for(T, kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
  auto reduce = [&](auto tag) {
    using M = decltype(tag);
    const M* dz = T > 0 ? workspace_base<M>(a.workspace) : nullptr;
    reduce_param_grads<M>(a.x, a.mixes, m, pre_group, dz, dz ? dz + T * m : nullptr, a.grad_fn, a.grad_base,
                          a.grad_scale, cfg, ctx);
  };
  if (a.x.dtype == DType::f64) reduce(double{});
  else reduce(float{});
}

void head_backward(const HeadBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.x.shape[0], n = a.x.shape[1];
  const auto kernel = MHC_CPU_PICK(head_backward_range, a.x.dtype);
  parallel_for(T, kTokenGrain, ctx, [&](int64_t t0, int64_t t1) { kernel(a, cfg, t0, t1); });
  auto reduce = [&](auto tag) {
    using M = decltype(tag);
    const M* dz = T > 0 ? workspace_base<M>(a.workspace) : nullptr;
    reduce_param_grads<M>(a.x, a.mixes, n, head_group, dz, dz ? dz + T * n : nullptr, a.grad_fn, a.grad_base,
                          a.grad_scale, cfg, ctx);
  };
  if (a.x.dtype == DType::f64) reduce(double{});
  else reduce(float{});
}

}  // namespace mhc::cpu_fast
