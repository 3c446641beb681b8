// Multi-history skip ops on CUDA against the fp64 CPU reference: fresh random inputs, NaN-poisoned
// outputs, every dtype pair, vectorised and scalar paths (odd sizes, misaligned views), the matrix
// form, the fused skip, the zero-weight rule and run-to-run determinism. Skips without a device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/float_types.hpp"
#include "mhc/history.hpp"
#include "mhc/ops.hpp"

namespace history_gpu_test {

using namespace mhc;

#define CHECK_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// A host tensor with a device mirror. `offset` elements of slack in front make a misaligned view.
struct Buf {
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> host;
  void* dev = nullptr;
  std::int64_t offset = 0;

  Buf() = default;
  Buf(DType dt, std::vector<std::int64_t> s, std::int64_t off = 0) : dtype(dt), shape(std::move(s)), offset(off) {
    host.resize(static_cast<std::size_t>(numel()) * dtype_size(dtype));
    const std::size_t bytes = (numel() + offset) * dtype_size(dtype) + 16;
    EXPECT_EQ(cudaMalloc(&dev, bytes), cudaSuccess);
    poison();
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept { *this = std::move(o); }
  Buf& operator=(Buf&& o) noexcept {
    std::swap(dtype, o.dtype);
    std::swap(shape, o.shape);
    std::swap(host, o.host);
    std::swap(dev, o.dev);
    std::swap(offset, o.offset);
    return *this;
  }
  ~Buf() {
    if (dev) cudaFree(dev);
  }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  unsigned char* dev_data() const { return static_cast<unsigned char*>(dev) + offset * dtype_size(dtype); }
  TensorView view(bool on_device) const {
    TensorView t;
    t.data = on_device ? static_cast<void*>(dev_data()) : const_cast<unsigned char*>(host.data());
    t.dtype = dtype;
    t.device = on_device ? Device{DeviceType::cuda, 0} : Device{};
    t.rank = static_cast<int>(shape.size());
    std::int64_t stride = 1;
    for (int d = t.rank - 1; d >= 0; --d) {
      t.shape[d] = shape[d];
      t.strides[d] = stride;
      stride *= shape[d];
    }
    return t;
  }
  double get(std::int64_t i) const {
    return detail::dispatch_storage(dtype, [&](auto tag) -> double {
      using S = decltype(tag);
      return static_cast<double>(detail::load(reinterpret_cast<const S*>(host.data()), i));
    });
  }
  void set(std::int64_t i, double v) {
    detail::dispatch_storage(dtype, [&](auto tag) {
      using S = decltype(tag);
      if constexpr (std::is_same_v<S, double>) reinterpret_cast<double*>(host.data())[i] = v;
      else detail::store(reinterpret_cast<S*>(host.data()), i, static_cast<float>(v));
    });
  }
  void upload() { EXPECT_EQ(cudaMemcpy(dev_data(), host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess); }
  void download() {
    EXPECT_EQ(cudaMemcpy(host.data(), dev_data(), host.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  }
  // NaN on both sides: elements an op fails to write show up.
  void poison() {
    for (std::int64_t i = 0; i < numel(); ++i) set(i, std::numeric_limits<double>::quiet_NaN());
    upload();
  }
  void random(std::mt19937& rng, double lo = -1.0, double hi = 1.0) {
    std::uniform_real_distribution<double> u(lo, hi);
    for (std::int64_t i = 0; i < numel(); ++i) set(i, u(rng));
    upload();
  }
  std::vector<unsigned char> device_bytes() const {
    std::vector<unsigned char> b(host.size());
    EXPECT_EQ(cudaMemcpy(b.data(), dev_data(), b.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    return b;
  }
};

std::vector<TensorView> views(const std::vector<Buf>& bufs, bool dev) {
  std::vector<TensorView> v;
  for (const Buf& b : bufs) v.push_back(b.view(dev));
  return v;
}

const Context kRef{Backend::cpu_reference};
const Context kCuda{Backend::cuda};

double tol_of(DType dt) { return dt == DType::f64 ? 1e-12 : dt == DType::f32 ? 2e-5 : 1e-2; }
DType coef_of(DType stream) { return stream == DType::f64 ? DType::f64 : DType::f32; }

// Compares the device copy of `got` with the host values of `want`.
void expect_close(Buf& got, const Buf& want, double rtol, double atol, const std::string& what) {
  got.download();
  int bad = 0;
  for (std::int64_t i = 0; i < got.numel(); ++i) {
    const double g = got.get(i), w = want.get(i);
    if (!(std::abs(g - w) <= atol + rtol * std::abs(w)) && ++bad <= 5)
      ADD_FAILURE() << what << " [" << i << "]: got " << g << ", want " << w;
  }
  EXPECT_EQ(bad, 0) << what;
}

struct Workspace {
  void* dev = nullptr;
  std::size_t bytes = 0;
  explicit Workspace(std::size_t n) : bytes(n) {
    if (n) EXPECT_EQ(cudaMalloc(&dev, n), cudaSuccess);
    if (n) cudaMemset(dev, 0xff, n);  // poisoned: backends must not assume zeros
  }
  ~Workspace() {
    if (dev) cudaFree(dev);
  }
  TensorView view() const {
    if (!bytes) return TensorView::absent();
    TensorView t = TensorView::contiguous(dev, DType::f32, {static_cast<std::int64_t>((bytes + 3) / 4)});
    t.device = {DeviceType::cuda, 0};
    return t;
  }
};

class HistoryGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!built_with_cuda() || !have_device()) GTEST_SKIP() << "no CUDA device";
  }
};

// ---- projections ----------------------------------------------------------------------------------

TEST_F(HistoryGpu, ProjectForwardAndBackward) {
  std::mt19937 rng(1);
  for (Constraint c : {Constraint::simplex, Constraint::softmax, Constraint::identity, Constraint::doubly_stochastic})
    for (DType dt : {DType::f32, DType::f64})
      for (std::int64_t H : {1, 3, 8, 37}) {
        if (c == Constraint::doubly_stochastic && H > 8) continue;
        HistoryConfig cfg;
        cfg.constraint = c;
        cfg.temperature = 0.75f;
        cfg.epsilon = 0.2f;
        cfg.sinkhorn_iters = 6;
        const std::int64_t R = 5;
        std::vector<std::int64_t> shape = c == Constraint::doubly_stochastic ? std::vector<std::int64_t>{R, H, H}
                                                                             : std::vector<std::int64_t>{R, H};
        Buf logits(dt, shape), w_ref(dt, shape), w(dt, shape), g(dt, shape), gz_ref(dt, shape), gz(dt, shape);
        logits.random(rng, -2, 2);
        g.random(rng);
        project_logits_forward({logits.view(false), w_ref.view(false)}, cfg, kRef);
        project_logits_forward({logits.view(true), w.view(true)}, cfg, kCuda);
        CHECK_CUDA(cudaDeviceSynchronize());
        const std::string what = std::string(constraint_name(c)) + " " + dtype_name(dt) + " H=" + std::to_string(H);
        const double tol = dt == DType::f64 ? 1e-12 : 1e-5;
        expect_close(w, w_ref, tol, tol * 0.1, what + " weights");
        project_logits_backward({logits.view(false), w_ref.view(false), g.view(false), gz_ref.view(false)}, cfg, kRef);
        project_logits_backward({logits.view(true), w.view(true), g.view(true), gz.view(true)}, cfg, kCuda);
        CHECK_CUDA(cudaDeviceSynchronize());
        expect_close(gz, gz_ref, dt == DType::f64 ? 1e-10 : 1e-4, dt == DType::f64 ? 1e-11 : 1e-5, what + " grad");
      }
}

// ---- mix ------------------------------------------------------------------------------------------

struct Pair {
  DType stream, storage;
};
const Pair kPairs[] = {{DType::f32, DType::f32},  {DType::f64, DType::f64}, {DType::f16, DType::f16},
                       {DType::bf16, DType::bf16}, {DType::f32, DType::f16}, {DType::f32, DType::bf16},
                       {DType::f16, DType::f32},  {DType::bf16, DType::f32}};

struct Case {
  int H;
  std::int64_t R;  // 0: vector weights
  std::vector<std::int64_t> shape;
  std::int64_t offset;  // > 0: misaligned views (scalar path)
  bool with_x, with_gate, grad_states;
};

const Case kCases[] = {
    {4, 0, {3, 4096}, 0, true, true, true},    // vectorised
    {1, 0, {1023}, 0, true, false, true},      // odd N: scalar path
    {9, 0, {2, 2048}, 0, true, true, true},    // H > 8: the wide accumulator kernel
    {3, 0, {4096}, 1, true, true, false},      // misaligned
    {3, 3, {2, 1024}, 0, false, true, true},   // matrix, x absent
    {2, 4, {777}, 0, true, false, true},       // matrix, odd
    {64, 0, {256}, 0, true, false, false},     // the most states
};

TEST_F(HistoryGpu, MixForwardAndBackwardMatchReference) {
  std::mt19937 rng(2);
  for (const Pair& p : kPairs)
    for (const Case& c : kCases) {
      const std::string what = std::string(dtype_name(p.stream)) + "/" + dtype_name(p.storage) + " H=" +
                               std::to_string(c.H) + " R=" + std::to_string(c.R) + " off=" + std::to_string(c.offset);
      const DType coef = coef_of(p.stream);
      std::vector<Buf> states;
      for (int k = 0; k < c.H; ++k) {
        states.emplace_back(p.storage, c.shape, c.offset);
        states.back().random(rng);
      }
      std::vector<std::int64_t> out_shape = c.shape;
      if (c.R) out_shape.insert(out_shape.begin(), c.R);
      Buf weights(coef, c.R ? std::vector<std::int64_t>{c.R, c.H} : std::vector<std::int64_t>{c.H});
      weights.random(rng, 0, 1);
      if (c.H > 2) {
        weights.set(1, 0.0);
        weights.upload();
      }
      Buf x(p.stream, out_shape, c.offset), gate(coef, {1});
      x.random(rng);
      gate.set(0, 0.7);
      gate.upload();
      const TensorView gate_h = c.with_gate ? gate.view(false) : TensorView::absent();
      const TensorView gate_d = c.with_gate ? gate.view(true) : TensorView::absent();
      Buf out_ref(p.stream, out_shape), out(p.stream, out_shape, c.offset);
      const auto sv_h = views(states, false), sv_d = views(states, true);
      history_mix_forward({c.with_x ? x.view(false) : TensorView::absent(), sv_h, weights.view(false), gate_h,
                           out_ref.view(false)},
                          {}, kRef);
      history_mix_forward({c.with_x ? x.view(true) : TensorView::absent(), sv_d, weights.view(true), gate_d,
                           out.view(true)},
                          {}, kCuda);
      CHECK_CUDA(cudaDeviceSynchronize());
      expect_close(out, out_ref, tol_of(p.stream), tol_of(p.stream), what + " out");

      Buf grad_out(p.stream, out_shape, c.offset);
      grad_out.random(rng);
      Buf gw_ref(coef, weights.shape), gw(coef, weights.shape), gg_ref(coef, {1}), gg(coef, {1});
      std::vector<Buf> gs_ref, gs;
      if (c.grad_states)
        for (int k = 0; k < c.H; ++k) {
          gs_ref.emplace_back(p.storage, c.shape);
          gs.emplace_back(p.storage, c.shape, c.offset);
        }
      const auto gsv_h = views(gs_ref, false), gsv_d = views(gs, true);
      HistoryMixBackward b;
      b.grad_out = grad_out.view(false);
      b.states = sv_h;
      b.weights = weights.view(false);
      b.gate = gate_h;
      b.grad_weights = gw_ref.view(false);
      b.grad_gate = c.with_gate ? gg_ref.view(false) : TensorView::absent();
      b.grad_states = gsv_h;
      history_mix_backward(b, {}, kRef);
      b.grad_out = grad_out.view(true);
      b.states = sv_d;
      b.weights = weights.view(true);
      b.gate = gate_d;
      b.grad_weights = gw.view(true);
      b.grad_gate = c.with_gate ? gg.view(true) : TensorView::absent();
      b.grad_states = gsv_d;
      Workspace ws(history_mix_backward_workspace_bytes(b, {}, kCuda));
      b.workspace = ws.view();
      history_mix_backward(b, {}, kCuda);
      CHECK_CUDA(cudaDeviceSynchronize());
      std::int64_t N = 1;
      for (auto d : c.shape) N *= d;
      const double dot_tol = (p.stream == DType::f64 ? 1e-12 : 1e-5) * std::sqrt(static_cast<double>(N));
      expect_close(gw, gw_ref, dot_tol, dot_tol, what + " grad_weights");
      if (c.with_gate) expect_close(gg, gg_ref, dot_tol, dot_tol, what + " grad_gate");
      for (std::size_t k = 0; k < gs.size(); ++k)
        expect_close(gs[k], gs_ref[k], tol_of(p.storage), tol_of(p.storage), what + " grad_states");
    }
}

// ---- fused skip -----------------------------------------------------------------------------------

TEST_F(HistoryGpu, FusedSkipMatchesReferenceAndIsDeterministic) {
  std::mt19937 rng(3);
  for (Constraint con : {Constraint::simplex, Constraint::softmax, Constraint::identity})
    for (const Pair& p : kPairs)
      for (int H : {1, 4, 8, 13}) {
        HistoryConfig cfg;
        cfg.constraint = con;
        cfg.temperature = 0.5f;
        cfg.epsilon = 0.25f;
        const std::vector<std::int64_t> shape{4, 2048};
        const std::string what = std::string(constraint_name(con)) + " " + dtype_name(p.stream) + "/" +
                                 dtype_name(p.storage) + " H=" + std::to_string(H);
        const DType coef = coef_of(p.stream);
        std::vector<Buf> states;
        for (int k = 0; k < H; ++k) {
          states.emplace_back(p.storage, shape);
          states.back().random(rng);
        }
        Buf x(p.stream, shape), logits(coef, {H}), gate(coef, {1});
        x.random(rng);
        logits.random(rng, -1.5, 1.5);
        gate.set(0, 1.25);
        gate.upload();
        const auto sv_h = views(states, false), sv_d = views(states, true);
        Buf out_ref(p.stream, shape), w_ref(coef, {H}), out(p.stream, shape), w(coef, {H});
        history_skip_forward({x.view(false), sv_h, logits.view(false), gate.view(false), out_ref.view(false),
                              w_ref.view(false)},
                             cfg, kRef);
        history_skip_forward({x.view(true), sv_d, logits.view(true), gate.view(true), out.view(true), w.view(true)},
                             cfg, kCuda);
        CHECK_CUDA(cudaDeviceSynchronize());
        expect_close(w, w_ref, 1e-5, 1e-6, what + " weights");
        expect_close(out, out_ref, tol_of(p.stream), tol_of(p.stream), what + " out");

        Buf grad_out(p.stream, shape);
        grad_out.random(rng);
        Buf gz_ref(coef, {H}), gg_ref(coef, {1});
        std::vector<Buf> gs_ref;
        for (int k = 0; k < H; ++k) gs_ref.emplace_back(p.storage, shape);
        const auto gsv_h = views(gs_ref, false);
        HistorySkipBackward b;
        b.grad_out = grad_out.view(false);
        b.states = sv_h;
        b.logits = logits.view(false);
        b.weights = w_ref.view(false);
        b.gate = gate.view(false);
        b.grad_logits = gz_ref.view(false);
        b.grad_gate = gg_ref.view(false);
        b.grad_states = gsv_h;
        history_skip_backward(b, cfg, kRef);
        std::vector<unsigned char> first;
        for (int run = 0; run < 2; ++run) {
          Buf gz(coef, {H}), gg(coef, {1});
          std::vector<Buf> gs;
          for (int k = 0; k < H; ++k) gs.emplace_back(p.storage, shape);
          const auto gsv_d = views(gs, true);
          HistorySkipBackward d = b;
          d.grad_out = grad_out.view(true);
          d.states = sv_d;
          d.logits = logits.view(true);
          d.weights = w.view(true);
          d.gate = gate.view(true);
          d.grad_logits = gz.view(true);
          d.grad_gate = gg.view(true);
          d.grad_states = gsv_d;
          Workspace ws(history_skip_backward_workspace_bytes(d, cfg, kCuda));
          d.workspace = ws.view();
          history_skip_backward(d, cfg, kCuda);
          CHECK_CUDA(cudaDeviceSynchronize());
          const double dot_tol = (p.stream == DType::f64 ? 1e-12 : 1e-5) * std::sqrt(8192.0);
          expect_close(gz, gz_ref, dot_tol, dot_tol, what + " grad_logits");
          expect_close(gg, gg_ref, dot_tol, dot_tol, what + " grad_gate");
          for (int k = 0; k < H; ++k)
            expect_close(gs[k], gs_ref[k], tol_of(p.storage), tol_of(p.storage), what + " grad_states");
          if (run == 0) first = gz.device_bytes();
          else EXPECT_EQ(first, gz.device_bytes()) << what << ": backward not bit-identical run to run";
        }
      }
}

TEST_F(HistoryGpu, AbsentGradStatesAreNotWritten) {
  // Detached states: absent gradient buffers; the present ones match the reference.
  std::mt19937 rng(5);
  HistoryConfig cfg;
  cfg.constraint = Constraint::softmax;
  const std::vector<std::int64_t> shape{4096};
  std::vector<Buf> states;
  for (int k = 0; k < 3; ++k) {
    states.emplace_back(DType::f32, shape);
    states.back().random(rng);
  }
  Buf logits(DType::f32, {3}), w(DType::f32, {3}), grad_out(DType::f32, shape), gz_ref(DType::f32, {3}),
      gz(DType::f32, {3});
  logits.random(rng);
  grad_out.random(rng);
  Buf x(DType::f32, shape), out(DType::f32, shape);
  x.random(rng);
  const auto sv_h = views(states, false), sv_d = views(states, true);
  history_skip_forward({x.view(false), sv_h, logits.view(false), {}, out.view(false), w.view(false)}, cfg, kRef);
  w.upload();
  std::vector<Buf> gs_ref, gs;
  for (int k = 0; k < 3; ++k) {
    gs_ref.emplace_back(DType::f32, shape);
    gs.emplace_back(DType::f32, shape);
  }
  std::vector<TensorView> gref = views(gs_ref, false), gdev = views(gs, true);
  gref[1] = TensorView::absent();
  gdev[1] = TensorView::absent();
  HistorySkipBackward b;
  b.grad_out = grad_out.view(false);
  b.states = sv_h;
  b.logits = logits.view(false);
  b.weights = w.view(false);
  b.grad_logits = gz_ref.view(false);
  b.grad_states = gref;
  history_skip_backward(b, cfg, kRef);
  b.grad_out = grad_out.view(true);
  b.states = sv_d;
  b.logits = logits.view(true);
  b.weights = w.view(true);
  b.grad_logits = gz.view(true);
  b.grad_states = gdev;
  Workspace ws(history_skip_backward_workspace_bytes(b, cfg, kCuda));
  b.workspace = ws.view();
  history_skip_backward(b, cfg, kCuda);
  CHECK_CUDA(cudaDeviceSynchronize());
  expect_close(gz, gz_ref, 1e-4, 1e-4, "grad_logits");
  expect_close(gs[0], gs_ref[0], 1e-6, 1e-6, "grad_states[0]");
  expect_close(gs[2], gs_ref[2], 1e-6, 1e-6, "grad_states[2]");
  gs[1].download();
  for (std::int64_t i = 0; i < gs[1].numel(); ++i) ASSERT_TRUE(std::isnan(gs[1].get(i))) << i;
}

TEST_F(HistoryGpu, OneHotSkipsZeroWeightStates) {
  // One-hot sparsemax weights: the states with weight 0 hold NaN and must not be read.
  std::mt19937 rng(4);
  HistoryConfig cfg;
  std::vector<Buf> states;
  for (int k = 0; k < 4; ++k) {
    states.emplace_back(DType::bf16, std::vector<std::int64_t>{8192});
    if (k == 2) states.back().random(rng);
    else states.back().poison();
  }
  Buf x(DType::f32, {8192}), logits(DType::f32, {4}), out(DType::f32, {8192}), w(DType::f32, {4});
  x.random(rng);
  const double z[4] = {0.0, -1.0, 3.0, 0.5};
  for (int k = 0; k < 4; ++k) logits.set(k, z[k]);
  logits.upload();
  const auto sv = views(states, true);
  history_skip_forward({x.view(true), sv, logits.view(true), {}, out.view(true), w.view(true)}, cfg, kCuda);
  CHECK_CUDA(cudaDeviceSynchronize());
  out.download();
  w.download();
  EXPECT_EQ(w.get(2), 1.0);
  for (std::int64_t i = 0; i < 8192; ++i)
    ASSERT_FLOAT_EQ(out.get(i), static_cast<float>(x.get(i) + states[2].get(i))) << i;
  Buf grad_out(DType::f32, {8192}), gz(DType::f32, {4});
  grad_out.random(rng);
  HistorySkipBackward b;
  b.grad_out = grad_out.view(true);
  b.states = sv;
  b.logits = logits.view(true);
  b.weights = w.view(true);
  b.grad_logits = gz.view(true);
  Workspace ws(history_skip_backward_workspace_bytes(b, cfg, kCuda));
  b.workspace = ws.view();
  history_skip_backward(b, cfg, kCuda);
  CHECK_CUDA(cudaDeviceSynchronize());
  gz.download();
  for (int k = 0; k < 4; ++k) EXPECT_EQ(gz.get(k), 0.0) << k;
}

}  // namespace history_gpu_test
