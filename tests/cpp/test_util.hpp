// The support of every C++ test suite, CPU and GPU (gpu/gpu_harness.hpp builds on it): the one host tensor type
// (owning, any dtype), random fills, NaN poisoning, comparisons against the fp64 reference, finite
// differences, and the random inputs of each op ("problems" that own their inputs and outputs).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/float_types.hpp"
#include "mhc/mhc.hpp"

namespace mhc::test {

using std::int64_t;

inline const Context kRef{.backend = Backend::cpu_reference};
inline const Context kFast{.backend = Backend::cpu_fast};

inline DType coef_of(DType storage) { return storage == DType::f64 ? DType::f64 : DType::f32; }

// An owning, contiguous host tensor. Elements are read and written as double.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::vector<int64_t> shape) : dtype_(dtype), shape_(std::move(shape)) {
    bytes_.assign(static_cast<std::size_t>(numel()) * dtype_size(dtype_) + 1, 0);
  }

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  bool empty_tensor() const { return shape_.empty(); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape_) n *= s;
    return shape_.empty() ? 0 : n;
  }
  void* data() { return bytes_.data(); }
  const void* data() const { return bytes_.data(); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype_); }

  // A view of this tensor, or an absent view when the tensor was never shaped.
  TensorView view() const {
    if (shape_.empty()) return TensorView::absent();
    TensorView v;
    v.data = const_cast<unsigned char*>(bytes_.data());
    v.dtype = dtype_;
    v.rank = static_cast<int>(shape_.size());
    int64_t stride = 1;
    for (int d = v.rank - 1; d >= 0; --d) {
      v.shape[d] = shape_[d];
      v.strides[d] = stride;
      stride *= shape_[d];
    }
    return v;
  }

  double get(int64_t i) const {
    switch (dtype_) {
      case DType::f32: return reinterpret_cast<const float*>(bytes_.data())[i];
      case DType::f64: return reinterpret_cast<const double*>(bytes_.data())[i];
      case DType::f16: return detail::to_float(reinterpret_cast<const detail::f16*>(bytes_.data())[i]);
      case DType::bf16: return detail::to_float(reinterpret_cast<const detail::bf16*>(bytes_.data())[i]);
    }
    return 0;
  }
  void set(int64_t i, double v) {
    switch (dtype_) {
      case DType::f32: reinterpret_cast<float*>(bytes_.data())[i] = static_cast<float>(v); break;
      case DType::f64: reinterpret_cast<double*>(bytes_.data())[i] = v; break;
      case DType::f16: reinterpret_cast<detail::f16*>(bytes_.data())[i] = detail::to_f16(static_cast<float>(v)); break;
      case DType::bf16: reinterpret_cast<detail::bf16*>(bytes_.data())[i] = detail::to_bf16(static_cast<float>(v)); break;
    }
  }
  std::vector<double> values() const {
    std::vector<double> v(numel());
    for (int64_t i = 0; i < numel(); ++i) v[i] = get(i);
    return v;
  }
  bool bitwise_equal(const Tensor& o) const { return dtype_ == o.dtype_ && shape_ == o.shape_ && bytes_ == o.bytes_; }

  // Any standard engine: the suites seed their own (std::mt19937 or std::mt19937_64).
  template <class Rng> Tensor& uniform(Rng& rng, double lo, double hi) {
    std::uniform_real_distribution<double> d(lo, hi);
    for (int64_t i = 0; i < numel(); ++i) set(i, d(rng));
    return *this;
  }
  template <class Rng> Tensor& normal(Rng& rng, double stddev) {
    std::normal_distribution<double> d(0.0, stddev);
    for (int64_t i = 0; i < numel(); ++i) set(i, d(rng));
    return *this;
  }
  Tensor& fill(double v) {
    for (int64_t i = 0; i < numel(); ++i) set(i, v);
    return *this;
  }
  // NaN everywhere, so an element an op forgets to write shows up in the comparison.
  Tensor& poison() { return fill(std::numeric_limits<double>::quiet_NaN()); }

 private:
  DType dtype_ = DType::f32;
  std::vector<int64_t> shape_;
  std::vector<unsigned char> bytes_;
};

template <class Rng>
Tensor random_tensor(DType dtype, std::vector<int64_t> shape, Rng& rng, double lo = -1.0, double hi = 1.0) {
  Tensor t(dtype, std::move(shape));
  t.uniform(rng, lo, hi);
  return t;
}
template <class Rng> Tensor normal_tensor(DType dtype, std::vector<int64_t> shape, Rng& rng, double stddev) {
  Tensor t(dtype, std::move(shape));
  t.normal(rng, stddev);
  return t;
}
// An output: NaN until an op writes it.
inline Tensor poisoned_tensor(DType dtype, std::vector<int64_t> shape) {
  Tensor t(dtype, std::move(shape));
  t.poison();
  return t;
}

// Every element finite and |got - want| <= tol * (|want| + 0.1 * max|want|): relative for the
// significant elements, absolute (relative to the tensor's scale) for the ones near zero.
inline ::testing::AssertionResult close(const char* name, const Tensor& got, const Tensor& want, double tol) {
  if (got.shape() != want.shape()) return ::testing::AssertionFailure() << name << ": shapes differ";
  double scale = 0;
  for (int64_t i = 0; i < want.numel(); ++i) scale = std::max(scale, std::abs(want.get(i)));
  double worst = 0;
  int64_t worst_i = -1;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double g = got.get(i), w = want.get(i);
    if (!std::isfinite(g) || !std::isfinite(w))
      return ::testing::AssertionFailure() << name << "[" << i << "]: got " << g << ", want " << w;
    // The floor 0.01 * tol: inputs are O(1), so results that cancel to near zero carry an
    // absolute rounding error of the size of their terms' (fp32: ~1e-7).
    const double ratio = std::abs(g - w) / (std::abs(w) + 0.1 * scale + 0.01 + 1e-300);
    if (ratio > worst) {
      worst = ratio;
      worst_i = i;
    }
  }
  if (worst > tol)
    return ::testing::AssertionFailure() << name << "[" << worst_i << "]: got " << got.get(worst_i) << ", want "
                                         << want.get(worst_i) << " (relative error " << worst << " > " << tol
                                         << ", scale " << scale << ")";
  return ::testing::AssertionSuccess();
}

// Every element within |got - want| <= atol + rtol * |want| (a NaN anywhere fails), the first few
// misses named.
inline ::testing::AssertionResult close_elementwise(const std::string& name, const Tensor& got, const Tensor& want,
                                                    double rtol, double atol) {
  if (got.shape() != want.shape()) return ::testing::AssertionFailure() << name << ": shapes differ";
  int64_t bad = 0;
  std::ostringstream misses;
  misses.precision(17);
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double g = got.get(i), w = want.get(i);
    if (std::abs(g - w) <= atol + rtol * std::abs(w)) continue;
    if (++bad <= 5) misses << " [" << i << "] got " << g << ", want " << w << ";";
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << name << ": " << bad << " of " << want.numel() << " elements differ (rtol "
                                       << rtol << ", atol " << atol << "):" << misses.str();
}

// Runs f, which must throw exactly E (not a sibling type) with `needle` in its message.
template <class E, class F> ::testing::AssertionResult throws(F&& f, const std::string& needle) {
  try {
    f();
  } catch (const E& e) {
    if (std::string(e.what()).find(needle) == std::string::npos)
      return ::testing::AssertionFailure() << "message \"" << e.what() << "\" does not name \"" << needle << "\"";
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.what();
  }
  return ::testing::AssertionFailure() << "nothing thrown (expected an error naming \"" << needle << "\")";
}

// Tolerance of a fast path against the fp64 reference, by stream dtype.
inline double tolerance(DType storage) {
  switch (storage) {
    case DType::f64: return 1e-10;
    case DType::f32: return 2e-5;
    default: return 1e-2;
  }
}

// d loss / d param[i] by the central difference of step h; param[i] is restored.
inline double central_difference(Tensor& param, int64_t i, const std::function<double()>& loss, double h = 1e-6) {
  const double v = param.get(i);
  param.set(i, v + h);
  const double up = loss();
  param.set(i, v - h);
  const double down = loss();
  param.set(i, v);
  return (up - down) / (2 * h);
}

// Central finite differences of loss() with respect to (a sample of) the elements of `param`,
// compared with `analytic`. Both fp64. Checks every element up to `max_checks`, else a random
// sample that always includes the first and the last.
inline ::testing::AssertionResult finite_difference(const char* name, Tensor& param, const Tensor& analytic,
                                                    const std::function<double()>& loss, double tol,
                                                    std::mt19937_64& rng, int max_checks = 48, double h = 1e-6) {
  std::vector<int64_t> idx;
  const int64_t n = param.numel();
  if (n <= max_checks) {
    for (int64_t i = 0; i < n; ++i) idx.push_back(i);
  } else {
    idx = {0, n - 1};
    std::uniform_int_distribution<int64_t> d(0, n - 1);
    while (static_cast<int>(idx.size()) < max_checks) idx.push_back(d(rng));
  }
  double scale = 0;
  for (int64_t i = 0; i < analytic.numel(); ++i) scale = std::max(scale, std::abs(analytic.get(i)));
  for (int64_t i : idx) {
    const double fd = central_difference(param, i, loss, h), an = analytic.get(i);
    if (!(std::abs(fd - an) <= tol * (std::abs(fd) + 0.1 * scale) + 1e-12))
      return ::testing::AssertionFailure() << name << "[" << i << "]: finite difference " << fd << ", analytic "
                                           << an << " (scale " << scale << ")";
  }
  return ::testing::AssertionSuccess();
}

// sum_i w[i] * t[i]
inline double weighted_sum(const Tensor& t, const Tensor& w) {
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) s += t.get(i) * w.get(i);
  return s;
}

inline Tensor make_workspace(std::size_t bytes) {
  Tensor ws(DType::f32, {static_cast<int64_t>((bytes + 3) / 4)});
  ws.poison();
  return ws;
}

// ---- one problem per op: inputs (random, never zeros), outputs (poisoned before every run) ---------
struct Shape {
  int64_t T, n, C;
  DType dtype;
};

inline std::string shape_name(const Shape& s) {
  return std::string(dtype_name(s.dtype)) + "_T" + std::to_string(s.T) + "_n" + std::to_string(s.n) + "_C" +
         std::to_string(s.C);
}

inline MhcConfig config_for(int64_t n) {
  MhcConfig cfg;
  cfg.n = static_cast<int>(n);
  return cfg;
}

// Parameters of a projection site: fn [rows, n*C] scaled so mixes are O(1), base, scale.
struct SiteParams {
  Tensor fn, base, scale;
  SiteParams() = default;
  SiteParams(const Shape& s, int64_t rows, int64_t scales, std::mt19937_64& rng, bool static_mode) {
    const DType k = coef_of(s.dtype);
    const double amp = 2.0 / std::sqrt(static_cast<double>(s.n * s.C));
    if (!static_mode) fn = random_tensor(k, {rows, s.n * s.C}, rng, -amp, amp);
    base = random_tensor(k, {rows}, rng);
    if (!static_mode) scale = random_tensor(k, {scales}, rng, 0.5, 1.5);
  }
};

struct PreProblem {
  Shape s;
  int64_t m;
  Tensor x;
  SiteParams p;
  Tensor layer_input, h_pre, h_post, comb, mixes, rstd;

  PreProblem(const Shape& shape, std::mt19937_64& rng, bool static_mode = false)
      : s(shape), m(shape.n * shape.n + 2 * shape.n) {
    const DType k = coef_of(s.dtype);
    x = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
    p = SiteParams(s, m, 3, rng, static_mode);
    layer_input = Tensor(s.dtype, {s.T, s.C});
    h_pre = Tensor(k, {s.T, s.n});
    h_post = Tensor(k, {s.T, s.n});
    comb = Tensor(k, {s.T, s.n, s.n});
    mixes = Tensor(k, {s.T, m});
    rstd = Tensor(k, {s.T});
  }
  PreForward args() const {
    return {x.view(), p.fn.view(), p.base.view(), p.scale.view(), layer_input.view(), h_pre.view(),
            h_post.view(), comb.view(), mixes.view(), rstd.view()};
  }
  void run(const MhcConfig& cfg, const Context& ctx) {
    for (Tensor* t : {&layer_input, &h_pre, &h_post, &comb, &mixes, &rstd}) t->poison();
    pre_forward(args(), cfg, ctx);
  }
};

// Backward of pre: the forward's mixes and rstd (from the reference) plus random output grads.
struct PreBackwardProblem {
  PreProblem f;
  Tensor g_layer_input, g_h_pre, g_h_post, g_comb, g_x_accum;
  Tensor grad_x, grad_fn, grad_base, grad_scale, workspace;

  PreBackwardProblem(const Shape& shape, std::mt19937_64& rng, const MhcConfig& cfg, bool static_mode = false)
      : f(shape, rng, static_mode) {
    const Shape& s = f.s;
    const DType k = coef_of(s.dtype);
    f.run(cfg, kRef);
    g_layer_input = random_tensor(s.dtype, {s.T, s.C}, rng);
    g_h_pre = random_tensor(k, {s.T, s.n}, rng);
    g_h_post = random_tensor(k, {s.T, s.n}, rng);
    g_comb = random_tensor(k, {s.T, s.n, s.n}, rng);
    g_x_accum = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
    grad_x = Tensor(s.dtype, {s.T, s.n, s.C});
    if (!static_mode) grad_fn = Tensor(k, {f.m, s.n * s.C});
    grad_base = Tensor(k, {f.m});
    if (!static_mode) grad_scale = Tensor(k, {3});
  }
  PreBackward args() const {
    return {f.x.view(), f.p.fn.view(), f.p.base.view(), f.p.scale.view(), f.mixes.view(), f.rstd.view(),
            g_layer_input.view(), g_h_pre.view(), g_h_post.view(), g_comb.view(), g_x_accum.view(),
            grad_x.view(), grad_fn.view(), grad_base.view(), grad_scale.view(), workspace.view()};
  }
  void run(const MhcConfig& cfg, const Context& ctx) {
    workspace = make_workspace(pre_backward_workspace_bytes(args(), cfg, ctx));
    for (Tensor* t : {&grad_x, &grad_fn, &grad_base, &grad_scale}) t->poison();
    pre_backward(args(), cfg, ctx);
  }
};

struct PostProblem {
  Shape s;
  Tensor x, y, h_post, comb, x_next;
  PostProblem(const Shape& shape, std::mt19937_64& rng) : s(shape) {
    const DType k = coef_of(s.dtype);
    x = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
    y = random_tensor(s.dtype, {s.T, s.C}, rng);
    h_post = random_tensor(k, {s.T, s.n}, rng, 0.0, 2.0);
    comb = random_tensor(k, {s.T, s.n, s.n}, rng, 0.0, 1.0);
    x_next = Tensor(s.dtype, {s.T, s.n, s.C});
  }
  PostForward args() const { return {x.view(), y.view(), h_post.view(), comb.view(), x_next.view()}; }
  void run(const MhcConfig& cfg, const Context& ctx) {
    x_next.poison();
    post_forward(args(), cfg, ctx);
  }
};

struct PostBackwardProblem {
  PostProblem f;
  Tensor g_x_next, grad_x, grad_y, grad_h_post, grad_comb;
  PostBackwardProblem(const Shape& shape, std::mt19937_64& rng) : f(shape, rng) {
    const Shape& s = f.s;
    const DType k = coef_of(s.dtype);
    g_x_next = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
    grad_x = Tensor(s.dtype, {s.T, s.n, s.C});
    grad_y = Tensor(s.dtype, {s.T, s.C});
    grad_h_post = Tensor(k, {s.T, s.n});
    grad_comb = Tensor(k, {s.T, s.n, s.n});
  }
  PostBackward args() const {
    return {g_x_next.view(), f.x.view(),      f.y.view(),           f.h_post.view(),
            f.comb.view(),   grad_x.view(),   grad_y.view(),        grad_h_post.view(),
            grad_comb.view()};
  }
  void run(const MhcConfig& cfg, const Context& ctx) {
    for (Tensor* t : {&grad_x, &grad_y, &grad_h_post, &grad_comb}) t->poison();
    post_backward(args(), cfg, ctx);
  }
};

// Post of one site fused with the pre of the next.
struct PostPreProblem {
  PostProblem post;
  PreProblem pre;  // pre.x is unused: x_next is post.x_next
  PostPreProblem(const Shape& shape, std::mt19937_64& rng, bool static_mode = false)
      : post(shape, rng), pre(shape, rng, static_mode) {}
  PostPreForward args() const {
    return {post.x.view(),        post.y.view(),      post.h_post.view(), post.comb.view(),  pre.p.fn.view(),
            pre.p.base.view(),    pre.p.scale.view(), post.x_next.view(), pre.layer_input.view(),
            pre.h_pre.view(),     pre.h_post.view(),  pre.comb.view(),    pre.mixes.view(),  pre.rstd.view()};
  }
  void run(const MhcConfig& cfg, const Context& ctx) {
    for (Tensor* t : {&post.x_next, &pre.layer_input, &pre.h_pre, &pre.h_post, &pre.comb, &pre.mixes, &pre.rstd})
      t->poison();
    post_pre_forward(args(), cfg, ctx);
  }
};

struct SinkhornProblem {
  Tensor logits, comb, g_comb, grad_logits;
  SinkhornProblem(int64_t T, int64_t n, DType k, std::mt19937_64& rng, double spread = 2.0) {
    logits = random_tensor(k, {T, n, n}, rng, -spread, spread);
    comb = Tensor(k, {T, n, n});
    g_comb = random_tensor(k, {T, n, n}, rng);
    grad_logits = Tensor(k, {T, n, n});
  }
  void forward(const MhcConfig& cfg, const Context& ctx) {
    comb.poison();
    sinkhorn_forward({logits.view(), comb.view()}, cfg, ctx);
  }
  void backward(const MhcConfig& cfg, const Context& ctx) {
    grad_logits.poison();
    sinkhorn_backward({logits.view(), g_comb.view(), grad_logits.view()}, cfg, ctx);
  }
};

struct ExpandProblem {
  Tensor x, out, g_out, grad_x;
  ExpandProblem(const Shape& s, std::mt19937_64& rng) {
    x = random_tensor(s.dtype, {s.T, s.C}, rng);
    out = Tensor(s.dtype, {s.T, s.n, s.C});
    g_out = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
    grad_x = Tensor(s.dtype, {s.T, s.C});
  }
  void forward(const MhcConfig& cfg, const Context& ctx) {
    out.poison();
    expand_forward({x.view(), out.view()}, cfg, ctx);
  }
  void backward(const MhcConfig& cfg, const Context& ctx) {
    grad_x.poison();
    expand_backward({g_out.view(), grad_x.view()}, cfg, ctx);
  }
};

struct HeadProblem {
  Shape s;
  Tensor x;
  SiteParams p;
  Tensor out, weights, mixes, rstd;
  Tensor g_out, g_weights, grad_x, grad_fn, grad_base, grad_scale, workspace;
  HeadProblem(const Shape& shape, std::mt19937_64& rng, bool static_mode = false) : s(shape) {
    const DType k = coef_of(s.dtype);
    x = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
    p = SiteParams(s, s.n, 1, rng, static_mode);
    out = Tensor(s.dtype, {s.T, s.C});
    weights = Tensor(k, {s.T, s.n});
    mixes = Tensor(k, {s.T, s.n});
    rstd = Tensor(k, {s.T});
    g_out = random_tensor(s.dtype, {s.T, s.C}, rng);
    g_weights = random_tensor(k, {s.T, s.n}, rng);
    grad_x = Tensor(s.dtype, {s.T, s.n, s.C});
    if (!static_mode) grad_fn = Tensor(k, {s.n, s.n * s.C});
    grad_base = Tensor(k, {s.n});
    if (!static_mode) grad_scale = Tensor(k, {1});
  }
  HeadForward forward_args() const {
    return {x.view(), p.fn.view(), p.base.view(), p.scale.view(), out.view(), weights.view(), mixes.view(),
            rstd.view()};
  }
  HeadBackward backward_args() const {
    return {x.view(),      p.fn.view(),    p.base.view(),    p.scale.view(),   mixes.view(),
            rstd.view(),   g_out.view(),   g_weights.view(), grad_x.view(),    grad_fn.view(),
            grad_base.view(), grad_scale.view(), workspace.view()};
  }
  void forward(const MhcConfig& cfg, const Context& ctx) {
    for (Tensor* t : {&out, &weights, &mixes, &rstd}) t->poison();
    head_forward(forward_args(), cfg, ctx);
  }
  void backward(const MhcConfig& cfg, const Context& ctx) {
    workspace = make_workspace(head_backward_workspace_bytes(backward_args(), cfg, ctx));
    for (Tensor* t : {&grad_x, &grad_fn, &grad_base, &grad_scale}) t->poison();
    head_backward(backward_args(), cfg, ctx);
  }
};

struct ResidualAddAggProblem {
  Tensor x, res, h_pre, x_out, agg;
  Tensor g_x_out, g_agg, grad_sum, grad_h_pre;
  ResidualAddAggProblem(const Shape& s, std::mt19937_64& rng) {
    const DType k = coef_of(s.dtype);
    x = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
    res = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
    h_pre = random_tensor(k, {s.T, s.n}, rng, 0.0, 1.0);
    x_out = Tensor(s.dtype, {s.T, s.n, s.C});
    agg = Tensor(s.dtype, {s.T, s.C});
    g_x_out = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
    g_agg = random_tensor(s.dtype, {s.T, s.C}, rng);
    grad_sum = Tensor(s.dtype, {s.T, s.n, s.C});
    grad_h_pre = Tensor(k, {s.T, s.n});
  }
  void forward(const MhcConfig& cfg, const Context& ctx) {
    x_out.poison();
    agg.poison();
    residual_add_agg_forward({x.view(), res.view(), h_pre.view(), x_out.view(), agg.view()}, cfg, ctx);
  }
  // The backward reads x_out: the forward must have run.
  void backward(const MhcConfig& cfg, const Context& ctx) {
    grad_sum.poison();
    grad_h_pre.poison();
    residual_add_agg_backward({g_x_out.view(), g_agg.view(), x_out.view(), h_pre.view(), grad_sum.view(),
                               grad_h_pre.view()},
                              cfg, ctx);
  }
};

// ---- the multi-history family (include/mhc/history.hpp) -----------------------------------------------

// The (stream, storage) dtype pairs of the history ops.
struct StoragePair {
  DType stream, storage;
};
inline const StoragePair kStoragePairs[] = {{DType::f32, DType::f32},  {DType::f64, DType::f64},
                                            {DType::f16, DType::f16},  {DType::bf16, DType::bf16},
                                            {DType::f32, DType::f16},  {DType::f32, DType::bf16},
                                            {DType::f16, DType::f32},  {DType::bf16, DType::f32}};

inline std::string pair_name(const StoragePair& p) {
  return std::string(dtype_name(p.stream)) + "/" + dtype_name(p.storage);
}

// Tolerance of a history op's output, stored in `dt`, against the fp64 reference.
inline double history_tol(DType dt) {
  switch (dt) {
    case DType::f64: return 1e-12;
    case DType::f32: return 2e-5;
    default: return 1e-2;
  }
}

inline std::vector<int64_t> with_lead(int64_t lead, std::vector<int64_t> shape) {
  shape.insert(shape.begin(), lead);
  return shape;
}

// Logits of a projection: [R, H], or R square matrices [R, H, H] for doubly_stochastic.
inline std::vector<int64_t> logits_shape(Constraint c, int64_t R, int64_t H) {
  return c == Constraint::doubly_stochastic ? std::vector<int64_t>{R, H, H} : std::vector<int64_t>{R, H};
}

template <class Rng>
std::vector<Tensor> random_states(int H, DType dtype, const std::vector<int64_t>& shape, Rng& rng) {
  std::vector<Tensor> states;
  for (int k = 0; k < H; ++k) states.push_back(random_tensor(dtype, shape, rng));
  return states;
}
// The grad_states outputs of a backward.
inline std::vector<Tensor> poisoned_states(int H, DType dtype, const std::vector<int64_t>& shape) {
  std::vector<Tensor> states;
  for (int k = 0; k < H; ++k) states.push_back(poisoned_tensor(dtype, shape));
  return states;
}
inline std::vector<TensorView> views(const std::vector<Tensor>& tensors) {
  std::vector<TensorView> v;
  for (const Tensor& t : tensors) v.push_back(t.view());
  return v;
}

// A mix op's case: H states of `shape`; vector weights [H] (R = 0) or the matrix form [R, H].
struct MixSpec {
  StoragePair pair;
  int H;
  int64_t R;
  std::vector<int64_t> shape;
  bool with_x, with_gate;
};

// Its inputs: states in [-1, 1), weights in [0, 1) with weight 1 exactly 0 when H > 2 (a zero weight
// exercises the skip), x like out and gate [1] = gate_value when the case has them (else absent).
struct MixInputs {
  std::vector<Tensor> states;
  Tensor x, weights, gate;
  std::vector<int64_t> out_shape;

  template <class Rng> MixInputs(const MixSpec& c, Rng& rng, double gate_value = 0.8) {
    states = random_states(c.H, c.pair.storage, c.shape, rng);
    out_shape = c.R ? with_lead(c.R, c.shape) : c.shape;
    const DType coef = coef_of(c.pair.stream);
    weights = random_tensor(coef, c.R ? std::vector<int64_t>{c.R, c.H} : std::vector<int64_t>{c.H}, rng, 0.0, 1.0);
    if (c.H > 2) weights.set(1, 0.0);
    if (c.with_x) x = random_tensor(c.pair.stream, out_shape, rng);
    if (c.with_gate) gate = Tensor(coef, {1}).fill(gate_value);
  }
};

// A fused skip's inputs: H states and x of `shape`, logits [H] in [-spread, spread), gate [1].
struct SkipInputs {
  std::vector<Tensor> states;
  Tensor x, logits, gate;

  template <class Rng>
  SkipInputs(const StoragePair& pair, int H, const std::vector<int64_t>& shape, Rng& rng, double spread,
             double gate_value) {
    states = random_states(H, pair.storage, shape, rng);
    x = random_tensor(pair.stream, shape, rng);
    logits = random_tensor(coef_of(pair.stream), {H}, rng, -spread, spread);
    gate = Tensor(coef_of(pair.stream), {1}).fill(gate_value);
  }
};

}  // namespace mhc::test
