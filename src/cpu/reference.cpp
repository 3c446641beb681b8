// The CPU reference of every n-stream op: plain loops over tokens, streams and channels,
// every sum accumulated in fp64. It is the oracle that the fast CPU path and the CUDA kernels
// are tested against, so it favours being obviously right over being fast.
#include <cmath>
#include <cstdint>
#include <vector>

#include "backend.hpp"
#include "common/float_types.hpp"
#include "cpu/reference_sinkhorn.hpp"

namespace mhc::cpu_ref {

namespace {

using std::int64_t;
using Matrix = std::vector<double>;  // n x n, row-major
using sinkhorn::SinkhornTrace;
using sinkhorn::sinkhorn_trace;
using sinkhorn::sinkhorn_trace_backward;

// Element i of a contiguous tensor of any supported dtype, as fp64.
double get(const TensorView& t, int64_t i) {
  switch (t.dtype) {
    case DType::f32: return t.ptr<const float>()[i];
    case DType::f64: return t.ptr<const double>()[i];
    case DType::f16: return detail::to_float(t.ptr<const detail::f16>()[i]);
    case DType::bf16: return detail::to_float(t.ptr<const detail::bf16>()[i]);
  }
  return 0.0;
}

// Stores v into element i, rounded to the tensor's dtype.
void put(const TensorView& t, int64_t i, double v) {
  switch (t.dtype) {
    case DType::f32: t.ptr<float>()[i] = static_cast<float>(v); break;
    case DType::f64: t.ptr<double>()[i] = v; break;
    case DType::f16: t.ptr<detail::f16>()[i] = detail::to_f16(static_cast<float>(v)); break;
    case DType::bf16: t.ptr<detail::bf16>()[i] = detail::to_bf16(static_cast<float>(v)); break;
  }
}

double get_or(const TensorView& t, int64_t i, double fallback) { return t.present() ? get(t, i) : fallback; }

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// ---- the RMS-normalised projection shared by pre and head -----------------------------------
// mixes[r] = rstd * raw[r], raw = fn @ vec(x[t]) over the token's flattened [n*C] block.
std::vector<double> project(const TensorView& x, const TensorView& fn, int64_t t, int64_t rows) {
  const int64_t nC = x.shape[1] * x.shape[2];
  std::vector<double> raw(rows, 0.0);  // zeros in static mode
  if (fn.present())
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < nC; ++j) raw[r] += get(fn, r * nC + j) * get(x, t * nC + j);
  return raw;
}

double rstd_of(const TensorView& x, int64_t t, double norm_eps) {
  const int64_t nC = x.shape[1] * x.shape[2];
  double sum_sq = 0.0;
  for (int64_t j = 0; j < nC; ++j) sum_sq += get(x, t * nC + j) * get(x, t * nC + j);
  return 1.0 / std::sqrt(sum_sq / static_cast<double>(nC) + norm_eps);
}

// Backward of mixes = rstd(x) * (fn @ vec(x)) for one token: accumulates grad_fn and returns d vec(x).
std::vector<double> projection_backward(const TensorView& x, const TensorView& fn, int64_t t, double rstd,
                                        const std::vector<double>& grad_mixes, std::vector<double>& grad_fn_acc) {
  const int64_t nC = x.shape[1] * x.shape[2];
  const int64_t rows = static_cast<int64_t>(grad_mixes.size());
  std::vector<double> grad_xv(nC, 0.0);
  if (!fn.present()) return grad_xv;  // static mode: mixes do not depend on x
  const std::vector<double> raw = project(x, fn, t, rows);
  double grad_rstd = 0.0;
  for (int64_t r = 0; r < rows; ++r) grad_rstd += grad_mixes[r] * raw[r];
  // rstd = (sum(x^2)/nC + eps)^(-1/2)  =>  d rstd / d x_j = -rstd^3 * x_j / nC
  const double rstd_slope = -rstd * rstd * rstd / static_cast<double>(nC);
  for (int64_t j = 0; j < nC; ++j) {
    const double xj = get(x, t * nC + j);
    double g = grad_rstd * rstd_slope * xj;
    for (int64_t r = 0; r < rows; ++r) {
      const double d_raw = grad_mixes[r] * rstd;
      g += get(fn, r * nC + j) * d_raw;
      grad_fn_acc[r * nC + j] += d_raw * xj;
    }
    grad_xv[j] = g;
  }
  return grad_xv;
}

// The per-token coefficients of a pre site, from its mixes.
struct Coefficients {
  std::vector<double> h_pre, pre_sig, h_post, post_sig;
  Matrix logits;
};

Coefficients coefficients(const std::vector<double>& mixes, const TensorView& base, const TensorView& scale,
                          int n, const MhcConfig& cfg) {
  const double s_pre = get_or(scale, 0, 0.0), s_post = get_or(scale, 1, 0.0), s_res = get_or(scale, 2, 0.0);
  Coefficients c;
  c.h_pre.resize(n);
  c.pre_sig.resize(n);
  c.h_post.resize(n);
  c.post_sig.resize(n);
  c.logits.resize(n * n);
  for (int i = 0; i < n; ++i) {
    c.pre_sig[i] = sigmoid(mixes[i] * s_pre + get(base, i));
    c.h_pre[i] = c.pre_sig[i] + cfg.pre_eps;
    c.post_sig[i] = sigmoid(mixes[n + i] * s_post + get(base, n + i));
    c.h_post[i] = c.post_sig[i] * cfg.post_mult;
  }
  for (int r = 0; r < n * n; ++r) c.logits[r] = mixes[2 * n + r] * s_res + get(base, 2 * n + r);
  return c;
}

void write_params_grad(const TensorView& out, const std::vector<double>& acc) {
  if (!out.present()) return;
  for (size_t i = 0; i < acc.size(); ++i) put(out, static_cast<int64_t>(i), acc[i]);
}

}  // namespace

// ---- pre --------------------------------------------------------------------------------------
void pre_forward(const PreForward& a, const MhcConfig& cfg, const Context&) {
  const int64_t T = a.x.shape[0], n = a.x.shape[1], C = a.x.shape[2], m = n * n + 2 * n;
  for (int64_t t = 0; t < T; ++t) {
    const double rstd = rstd_of(a.x, t, cfg.norm_eps);
    const std::vector<double> raw = project(a.x, a.fn, t, m);
    std::vector<double> mixes(m);
    for (int64_t r = 0; r < m; ++r) mixes[r] = raw[r] * rstd;
    const Coefficients c = coefficients(mixes, a.base, a.scale, static_cast<int>(n), cfg);
    const SinkhornTrace tr = sinkhorn_trace(c.logits, static_cast<int>(n), cfg.iters, cfg.eps);
    for (int64_t i = 0; i < n; ++i) {
      put(a.h_pre, t * n + i, c.h_pre[i]);
      put(a.h_post, t * n + i, c.h_post[i]);
    }
    for (int64_t r = 0; r < n * n; ++r) put(a.comb, t * n * n + r, tr.steps.back()[r]);
    for (int64_t ch = 0; ch < C; ++ch) {
      double acc = 0.0;
      for (int64_t i = 0; i < n; ++i) acc += c.h_pre[i] * get(a.x, (t * n + i) * C + ch);
      put(a.layer_input, t * C + ch, acc);
    }
    if (a.mixes.present())
      for (int64_t r = 0; r < m; ++r) put(a.mixes, t * m + r, mixes[r]);
    if (a.rstd.present()) put(a.rstd, t, rstd);
  }
}

std::size_t pre_forward_workspace_bytes(const PreForward&, const MhcConfig&, const Context&) { return 0; }
std::size_t post_pre_forward_workspace_bytes(const PostPreForward&, const MhcConfig&, const Context&) { return 0; }
std::size_t pre_backward_workspace_bytes(const PreBackward&, const MhcConfig&, const Context&) { return 0; }

void pre_backward(const PreBackward& a, const MhcConfig& cfg, const Context&) {
  const int64_t T = a.x.shape[0], n = a.x.shape[1], C = a.x.shape[2], m = n * n + 2 * n, nC = n * C;
  const double s_pre = get_or(a.scale, 0, 0.0), s_post = get_or(a.scale, 1, 0.0), s_res = get_or(a.scale, 2, 0.0);
  std::vector<double> grad_fn(a.fn.present() ? m * nC : 0, 0.0), grad_base(m, 0.0), grad_scale(3, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> mixes(m);
    for (int64_t r = 0; r < m; ++r) mixes[r] = get(a.mixes, t * m + r);
    const double rstd = get(a.rstd, t);
    const Coefficients c = coefficients(mixes, a.base, a.scale, static_cast<int>(n), cfg);

    std::vector<double> d_logit(m, 0.0);  // gradient of the pre-activation (mixes * scale + base)
    for (int64_t i = 0; i < n; ++i) {
      double d_h_pre = get_or(a.grad_h_pre, t * n + i, 0.0);
      if (a.grad_layer_input.present())
        for (int64_t ch = 0; ch < C; ++ch)
          d_h_pre += get(a.grad_layer_input, t * C + ch) * get(a.x, (t * n + i) * C + ch);
      d_logit[i] = d_h_pre * c.pre_sig[i] * (1.0 - c.pre_sig[i]);
      d_logit[n + i] = get_or(a.grad_h_post, t * n + i, 0.0) * cfg.post_mult * c.post_sig[i] * (1.0 - c.post_sig[i]);
    }
    if (a.grad_comb.present()) {
      Matrix g(n * n);
      for (int64_t r = 0; r < n * n; ++r) g[r] = get(a.grad_comb, t * n * n + r);
      const SinkhornTrace tr = sinkhorn_trace(c.logits, static_cast<int>(n), cfg.iters, cfg.eps);
      const Matrix gl = sinkhorn_trace_backward(tr, g, cfg.eps);
      for (int64_t r = 0; r < n * n; ++r) d_logit[2 * n + r] = gl[r];
    }

    std::vector<double> d_mixes(m);
    for (int64_t r = 0; r < m; ++r) {
      const int group = r < n ? 0 : (r < 2 * n ? 1 : 2);
      const double s = group == 0 ? s_pre : (group == 1 ? s_post : s_res);
      d_mixes[r] = d_logit[r] * s;
      grad_scale[group] += d_logit[r] * mixes[r];
      grad_base[r] += d_logit[r];
    }
    const std::vector<double> grad_xv = projection_backward(a.x, a.fn, t, rstd, d_mixes, grad_fn);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t ch = 0; ch < C; ++ch) {
        const int64_t idx = (t * n + i) * C + ch;
        double g = grad_xv[i * C + ch] + get_or(a.grad_x_accum, idx, 0.0);
        if (a.grad_layer_input.present()) g += c.h_pre[i] * get(a.grad_layer_input, t * C + ch);
        put(a.grad_x, idx, g);
      }
  }
  write_params_grad(a.grad_fn, grad_fn);
  write_params_grad(a.grad_base, grad_base);
  if (a.scale.present()) write_params_grad(a.grad_scale, grad_scale);
}

// ---- post -------------------------------------------------------------------------------------
void post_forward(const PostForward& a, const MhcConfig&, const Context&) {
  const int64_t T = a.x.shape[0], n = a.x.shape[1], C = a.x.shape[2];
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < n; ++o)
      for (int64_t ch = 0; ch < C; ++ch) {
        double acc = get(a.h_post, t * n + o) * get(a.y, t * C + ch);
        for (int64_t i = 0; i < n; ++i) acc += get(a.comb, (t * n + i) * n + o) * get(a.x, (t * n + i) * C + ch);
        put(a.x_next, (t * n + o) * C + ch, acc);
      }
}

void post_backward(const PostBackward& a, const MhcConfig&, const Context&) {
  const int64_t T = a.x.shape[0], n = a.x.shape[1], C = a.x.shape[2];
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t ch = 0; ch < C; ++ch) {
      double gy = 0.0;
      for (int64_t o = 0; o < n; ++o) gy += get(a.h_post, t * n + o) * get(a.grad_x_next, (t * n + o) * C + ch);
      put(a.grad_y, t * C + ch, gy);
      for (int64_t i = 0; i < n; ++i) {
        double gx = 0.0;
        for (int64_t o = 0; o < n; ++o)
          gx += get(a.comb, (t * n + i) * n + o) * get(a.grad_x_next, (t * n + o) * C + ch);
        put(a.grad_x, (t * n + i) * C + ch, gx);
      }
    }
    for (int64_t o = 0; o < n; ++o) {
      double gh = 0.0;
      for (int64_t ch = 0; ch < C; ++ch) gh += get(a.grad_x_next, (t * n + o) * C + ch) * get(a.y, t * C + ch);
      put(a.grad_h_post, t * n + o, gh);
      for (int64_t i = 0; i < n; ++i) {
        double gc = 0.0;
        for (int64_t ch = 0; ch < C; ++ch)
          gc += get(a.grad_x_next, (t * n + o) * C + ch) * get(a.x, (t * n + i) * C + ch);
        put(a.grad_comb, (t * n + i) * n + o, gc);
      }
    }
  }
}

// The next site's pre reads x_next as stored (rounded to the stream dtype), exactly as the
// unfused post followed by pre would.
void post_pre_forward(const PostPreForward& a, const MhcConfig& cfg, const Context& ctx) {
  cpu_ref::post_forward({.x = a.x, .y = a.y, .h_post = a.h_post, .comb = a.comb, .x_next = a.x_next}, cfg, ctx);
  cpu_ref::pre_forward({.x = a.x_next,
               .fn = a.fn,
               .base = a.base,
               .scale = a.scale,
               .layer_input = a.layer_input,
               .h_pre = a.h_pre,
               .h_post = a.h_post_next,
               .comb = a.comb_next,
               .mixes = a.mixes,
               .rstd = a.rstd,
               .workspace = TensorView::absent()},
              cfg, ctx);
}

// ---- Sinkhorn alone ---------------------------------------------------------------------------
void sinkhorn_forward(const SinkhornForward& a, const MhcConfig& cfg, const Context&) {
  const int64_t T = a.logits.shape[0], n = a.logits.shape[1];
  for (int64_t t = 0; t < T; ++t) {
    Matrix logits(n * n);
    for (int64_t r = 0; r < n * n; ++r) logits[r] = get(a.logits, t * n * n + r);
    const SinkhornTrace tr = sinkhorn_trace(logits, static_cast<int>(n), cfg.iters, cfg.eps);
    for (int64_t r = 0; r < n * n; ++r) put(a.comb, t * n * n + r, tr.steps.back()[r]);
  }
}

void sinkhorn_backward(const SinkhornBackward& a, const MhcConfig& cfg, const Context&) {
  const int64_t T = a.logits.shape[0], n = a.logits.shape[1];
  for (int64_t t = 0; t < T; ++t) {
    Matrix logits(n * n), grad(n * n);
    for (int64_t r = 0; r < n * n; ++r) {
      logits[r] = get(a.logits, t * n * n + r);
      grad[r] = get(a.grad_comb, t * n * n + r);
    }
    const SinkhornTrace tr = sinkhorn_trace(logits, static_cast<int>(n), cfg.iters, cfg.eps);
    const Matrix g = sinkhorn_trace_backward(tr, grad, cfg.eps);
    for (int64_t r = 0; r < n * n; ++r) put(a.grad_logits, t * n * n + r, g[r]);
  }
}

// ---- stream expand ----------------------------------------------------------------------------
void expand_forward(const ExpandForward& a, const MhcConfig&, const Context&) {
  const int64_t T = a.out.shape[0], n = a.out.shape[1], C = a.out.shape[2];
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t ch = 0; ch < C; ++ch) put(a.out, (t * n + i) * C + ch, get(a.x, t * C + ch));
}

void expand_backward(const ExpandBackward& a, const MhcConfig&, const Context&) {
  const int64_t T = a.grad_out.shape[0], n = a.grad_out.shape[1], C = a.grad_out.shape[2];
  for (int64_t t = 0; t < T; ++t)
    for (int64_t ch = 0; ch < C; ++ch) {
      double acc = 0.0;
      for (int64_t i = 0; i < n; ++i) acc += get(a.grad_out, (t * n + i) * C + ch);
      put(a.grad_x, t * C + ch, acc);
    }
}

// ---- head -------------------------------------------------------------------------------------
void head_forward(const HeadForward& a, const MhcConfig& cfg, const Context&) {
  const int64_t T = a.x.shape[0], n = a.x.shape[1], C = a.x.shape[2];
  const double s = get_or(a.scale, 0, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const double rstd = rstd_of(a.x, t, cfg.norm_eps);
    const std::vector<double> raw = project(a.x, a.fn, t, n);
    std::vector<double> w(n);
    for (int64_t i = 0; i < n; ++i) {
      const double mix = raw[i] * rstd;
      w[i] = sigmoid(mix * s + get(a.base, i)) + cfg.pre_eps;
      put(a.weights, t * n + i, w[i]);
      if (a.mixes.present()) put(a.mixes, t * n + i, mix);
    }
    if (a.rstd.present()) put(a.rstd, t, rstd);
    for (int64_t ch = 0; ch < C; ++ch) {
      double acc = 0.0;
      for (int64_t i = 0; i < n; ++i) acc += w[i] * get(a.x, (t * n + i) * C + ch);
      put(a.out, t * C + ch, acc);
    }
  }
}

std::size_t head_backward_workspace_bytes(const HeadBackward&, const MhcConfig&, const Context&) { return 0; }

void head_backward(const HeadBackward& a, const MhcConfig& cfg, const Context&) {
  const int64_t T = a.x.shape[0], n = a.x.shape[1], C = a.x.shape[2], nC = n * C;
  const double s = get_or(a.scale, 0, 0.0);
  std::vector<double> grad_fn(a.fn.present() ? n * nC : 0, 0.0), grad_base(n, 0.0), grad_scale(1, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const double rstd = get(a.rstd, t);
    std::vector<double> w(n), d_mixes(n);
    for (int64_t i = 0; i < n; ++i) {
      const double mix = get(a.mixes, t * n + i);
      const double sig = sigmoid(mix * s + get(a.base, i));
      w[i] = sig + cfg.pre_eps;
      double d_w = get_or(a.grad_weights, t * n + i, 0.0);
      if (a.grad_out.present())
        for (int64_t ch = 0; ch < C; ++ch) d_w += get(a.grad_out, t * C + ch) * get(a.x, (t * n + i) * C + ch);
      const double d_logit = d_w * sig * (1.0 - sig);
      d_mixes[i] = d_logit * s;
      grad_scale[0] += d_logit * mix;
      grad_base[i] += d_logit;
    }
    const std::vector<double> grad_xv = projection_backward(a.x, a.fn, t, rstd, d_mixes, grad_fn);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t ch = 0; ch < C; ++ch) {
        double g = grad_xv[i * C + ch];
        if (a.grad_out.present()) g += w[i] * get(a.grad_out, t * C + ch);
        put(a.grad_x, (t * n + i) * C + ch, g);
      }
  }
  write_params_grad(a.grad_fn, grad_fn);
  write_params_grad(a.grad_base, grad_base);
  if (a.scale.present()) write_params_grad(a.grad_scale, grad_scale);
}

// ---- residual_add_agg ---------------------------------------------------------------------------
// agg reads x_out as stored, exactly as the unfused "x = x + res; aggregate(x)" would.
void residual_add_agg_forward(const ResidualAddAggForward& a, const MhcConfig&, const Context&) {
  const int64_t T = a.x.shape[0], n = a.x.shape[1], C = a.x.shape[2];
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < n * C; ++j) put(a.x_out, t * n * C + j, get(a.x, t * n * C + j) + get(a.res, t * n * C + j));
    for (int64_t ch = 0; ch < C; ++ch) {
      double acc = 0.0;
      for (int64_t i = 0; i < n; ++i) acc += get(a.h_pre, t * n + i) * get(a.x_out, (t * n + i) * C + ch);
      put(a.agg, t * C + ch, acc);
    }
  }
}

void residual_add_agg_backward(const ResidualAddAggBackward& a, const MhcConfig&, const Context&) {
  const int64_t T = a.x_out.shape[0], n = a.x_out.shape[1], C = a.x_out.shape[2];
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < n; ++i) {
      double gh = 0.0;
      for (int64_t ch = 0; ch < C; ++ch) {
        const int64_t idx = (t * n + i) * C + ch;
        const double g_agg = get_or(a.grad_agg, t * C + ch, 0.0);
        put(a.grad_sum, idx, get_or(a.grad_x_out, idx, 0.0) + get(a.h_pre, t * n + i) * g_agg);
        gh += g_agg * get(a.x_out, idx);
      }
      put(a.grad_h_pre, t * n + i, gh);
    }
}

}  // namespace mhc::cpu_ref
