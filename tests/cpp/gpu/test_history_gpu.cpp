// Multi-history skip ops on CUDA against the fp64 CPU reference (suites by op: CudaProjectLogits,
// CudaHistoryMix, CudaHistorySkip): fresh random inputs, NaN-poisoned outputs, every dtype pair,
// vectorised and scalar paths (odd sizes, misaligned views), the matrix form, the fused skip, the
// zero-weight rule and run-to-run bitwise determinism. Skips without a device.
#include <gtest/gtest.h>

#include <cmath>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "gpu_harness.hpp"

namespace mhc::gpu_test {
namespace {

using test::history_tol;
using test::logits_shape;
using test::MixInputs;
using test::MixSpec;
using test::pair_name;
using test::SkipInputs;
using test::StoragePair;

const Context kRef = ref_ctx();
const Context kCuda = cuda_ctx();

// Every (stream, storage) pair; under the sanitizers (quick) one of each kind: same dtype, wide stream with
// narrow states, narrow stream with f32 states, and f64.
std::vector<StoragePair> storage_pairs() {
  if (quick()) return {{DType::f32, DType::f32}, {DType::f64, DType::f64}, {DType::f32, DType::bf16},
                       {DType::bf16, DType::f32}};
  return {std::begin(test::kStoragePairs), std::end(test::kStoragePairs)};
}

// ---- project_logits -------------------------------------------------------------------------------

// Forward and backward of one projection on CUDA against the reference, each run twice (bitwise).
// The backward reads the CUDA forward's weights.
void run_project(Constraint c, DType dt, std::int64_t R, std::int64_t H, const HistoryConfig& cfg, std::mt19937& rng,
                 Tolerance weights_tol, Tolerance grad_tol) {
  const std::string what = std::string(constraint_name(c)) + " " + dtype_name(dt) + " R=" + std::to_string(R) +
                           " H=" + std::to_string(H) + " iters=" + std::to_string(cfg.sinkhorn_iters);
  const std::vector<std::int64_t> shape = logits_shape(c, R, H);
  Tensor logits = test::random_tensor(dt, shape, rng, -2, 2), g = test::random_tensor(dt, shape, rng);
  Tensor w_ref = poisoned_tensor(dt, shape), gz_ref = poisoned_tensor(dt, shape);
  project_logits_forward({logits.view(), w_ref.view()}, cfg, kRef);
  project_logits_backward({logits.view(), w_ref.view(), g.view(), gz_ref.view()}, cfg, kRef);
  DeviceTensor dlogits(logits), dg(g), dw(dt, shape), dgz(dt, shape);
  check_outputs([&] { project_logits_forward({dlogits.view(), dw.view()}, cfg, kCuda); },
                {{"weights", &w_ref, &dw, weights_tol}}, what + " project_logits_forward");
  check_outputs([&] { project_logits_backward({dlogits.view(), dw.view(), dg.view(), dgz.view()}, cfg, kCuda); },
                {{"grad_logits", &gz_ref, &dgz, grad_tol}}, what + " project_logits_backward");
}

TEST(CudaProjectLogits, ForwardAndBackwardMatchReference) {
  MHC_REQUIRE_GPU();
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
        const double tol = dt == DType::f64 ? 1e-12 : 1e-5;
        run_project(c, dt, 5, H, cfg, rng, Tolerance::elementwise(tol, tol * 0.1),
                    Tolerance::elementwise(dt == DType::f64 ? 1e-10 : 1e-4, dt == DType::f64 ? 1e-11 : 1e-5));
      }
}

// The doubly stochastic projection at the edges of what it accepts: H from 1 to kMaxHistory (one and two
// warps of the block), 1 and 20 iterations, a temperature other than 1; and 400 iterations, more steps
// than the backward keeps divisors for at H = 64 (it reverses them in chunks).
TEST(CudaProjectLogits, SinkhornEveryHeightAndIterationCount) {
  MHC_REQUIRE_GPU();
  std::mt19937 rng(6);
  const std::vector<std::int64_t> heights =
      quick() ? std::vector<std::int64_t>{1, 33, kMaxHistory}
              : std::vector<std::int64_t>{1, 2, 3, 31, 32, 33, kMaxHistory - 1, kMaxHistory};
  struct Run {
    std::int64_t H;
    int iters;
  };
  std::vector<Run> runs;
  for (std::int64_t H : heights)
    for (int iters : {1, 20}) runs.push_back({H, iters});
  runs.push_back({5, 400});
  runs.push_back({kMaxHistory, 400});
  for (DType dt : {DType::f32, DType::f64})
    for (const Run& r : runs) {
      HistoryConfig cfg;
      cfg.constraint = Constraint::doubly_stochastic;
      cfg.temperature = 0.6;
      cfg.sinkhorn_iters = r.iters;
      run_project(cfg.constraint, dt, 3, r.H, cfg, rng, coef_tol(dt), coef_tol(dt));
    }
}

TEST(CudaProjectLogits, NoMatricesIsANoOp) {
  MHC_REQUIRE_GPU();
  HistoryConfig cfg;
  cfg.constraint = Constraint::doubly_stochastic;
  DeviceTensor logits(DType::f32, {0, 4, 4}), w(DType::f32, {0, 4, 4}), g(DType::f32, {0, 4, 4}),
      gz(DType::f32, {0, 4, 4});
  project_logits_forward({logits.view(), w.view()}, cfg, kCuda);
  project_logits_backward({logits.view(), w.view(), g.view(), gz.view()}, cfg, kCuda);
  MHC_CHECK_CUDA(cudaDeviceSynchronize());
}

// ---- history_mix ----------------------------------------------------------------------------------

struct Case {
  int H;
  std::int64_t R;  // 0: vector weights
  std::vector<std::int64_t> shape;
  int offset;  // > 0: misaligned views (scalar path)
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

TEST(CudaHistoryMix, ForwardAndBackwardMatchReference) {
  MHC_REQUIRE_GPU();
  std::mt19937 rng(2);
  for (const StoragePair& p : storage_pairs())
    for (const Case& c : kCases) {
      const std::string what = pair_name(p) + " H=" + std::to_string(c.H) + " R=" + std::to_string(c.R) +
                               " off=" + std::to_string(c.offset);
      const DType coef = coef_of(p.stream);
      const MixSpec spec{p, c.H, c.R, c.shape, c.with_x, c.with_gate};
      const MixInputs in(spec, rng, 0.7);
      const std::vector<DeviceTensor> dstates = to_device(in.states, c.offset);
      const DeviceTensor dweights(in.weights), dgate(in.gate), dx(in.x, c.offset);
      const auto sv_h = views(in.states), sv_d = views(dstates);

      Tensor out_ref = poisoned_tensor(p.stream, in.out_shape);
      history_mix_forward({in.x.view(), sv_h, in.weights.view(), in.gate.view(), out_ref.view()}, {}, kRef);
      DeviceTensor dout(p.stream, in.out_shape, c.offset);
      check_outputs(
          [&] { history_mix_forward({dx.view(), sv_d, dweights.view(), dgate.view(), dout.view()}, {}, kCuda); },
          {{"out", &out_ref, &dout, Tolerance::elementwise(history_tol(p.stream), history_tol(p.stream))}},
          what + " history_mix_forward");

      const Tensor grad_out = test::random_tensor(p.stream, in.out_shape, rng);
      const DeviceTensor dgrad_out(grad_out, c.offset);
      Tensor gw_ref = poisoned_tensor(coef, in.weights.shape()), gg_ref = poisoned_tensor(coef, {1});
      std::vector<Tensor> gs_ref =
          c.grad_states ? test::poisoned_states(c.H, p.storage, c.shape) : std::vector<Tensor>{};
      const auto gsv_h = views(gs_ref);
      HistoryMixBackward b{.grad_out = grad_out.view(),
                           .states = sv_h,
                           .weights = in.weights.view(),
                           .gate = in.gate.view(),
                           .grad_weights = gw_ref.view(),
                           .grad_gate = c.with_gate ? gg_ref.view() : TensorView::absent(),
                           .grad_states = gsv_h};
      history_mix_backward(b, {}, kRef);

      DeviceTensor dgw(coef, in.weights.shape()), dgg(coef, {1});
      std::vector<DeviceTensor> dgs = device_outputs(gs_ref.size(), p.storage, c.shape, c.offset);
      const auto gsv_d = views(dgs);
      HistoryMixBackward d{.grad_out = dgrad_out.view(),
                           .states = sv_d,
                           .weights = dweights.view(),
                           .gate = dgate.view(),
                           .grad_weights = dgw.view(),
                           .grad_gate = c.with_gate ? dgg.view() : TensorView::absent(),
                           .grad_states = gsv_d};
      const DeviceWorkspace ws(history_mix_backward_workspace_bytes(d, {}, kCuda));
      d.workspace = ws.view();
      std::int64_t N = 1;
      for (auto n : c.shape) N *= n;
      const double dot_tol = (p.stream == DType::f64 ? 1e-12 : 1e-5) * std::sqrt(static_cast<double>(N));
      std::vector<Output> outs = {{"grad_weights", &gw_ref, &dgw, Tolerance::elementwise(dot_tol, dot_tol)}};
      if (c.with_gate) outs.push_back({"grad_gate", &gg_ref, &dgg, Tolerance::elementwise(dot_tol, dot_tol)});
      for (std::size_t k = 0; k < dgs.size(); ++k)
        outs.push_back({"grad_states", &gs_ref[k], &dgs[k],
                        Tolerance::elementwise(history_tol(p.storage), history_tol(p.storage))});
      check_outputs([&] { history_mix_backward(d, {}, kCuda); }, outs, what + " history_mix_backward");
    }
}

// ---- history_skip ---------------------------------------------------------------------------------

TEST(CudaHistorySkip, FusedSkipMatchesReferenceAndIsDeterministic) {
  MHC_REQUIRE_GPU();
  std::mt19937 rng(3);
  for (Constraint con : {Constraint::simplex, Constraint::softmax, Constraint::identity})
    for (const StoragePair& p : storage_pairs())
      for (int H : {1, 4, 8, 13}) {
        HistoryConfig cfg;
        cfg.constraint = con;
        cfg.temperature = 0.5f;
        cfg.epsilon = 0.25f;
        const std::vector<std::int64_t> shape{4, 2048};
        const std::string what = std::string(constraint_name(con)) + " " + pair_name(p) + " H=" + std::to_string(H);
        const DType coef = coef_of(p.stream);
        const SkipInputs in(p, H, shape, rng, 1.5, 1.25);
        const std::vector<DeviceTensor> dstates = to_device(in.states);
        const DeviceTensor dx(in.x), dlogits(in.logits), dgate(in.gate);
        const auto sv_h = views(in.states), sv_d = views(dstates);
        Tensor out_ref = poisoned_tensor(p.stream, shape), w_ref = poisoned_tensor(coef, {H});
        history_skip_forward({in.x.view(), sv_h, in.logits.view(), in.gate.view(), out_ref.view(), w_ref.view()}, cfg,
                             kRef);
        DeviceTensor dout(p.stream, shape), dw(coef, {H});
        check_outputs(
            [&] {
              history_skip_forward({dx.view(), sv_d, dlogits.view(), dgate.view(), dout.view(), dw.view()}, cfg, kCuda);
            },
            {{"weights", &w_ref, &dw, Tolerance::elementwise(1e-5, 1e-6)},
             {"out", &out_ref, &dout, Tolerance::elementwise(history_tol(p.stream), history_tol(p.stream))}},
            what + " history_skip_forward");

        const Tensor grad_out = test::random_tensor(p.stream, shape, rng);
        const DeviceTensor dgrad_out(grad_out);
        Tensor gz_ref = poisoned_tensor(coef, {H}), gg_ref = poisoned_tensor(coef, {1});
        std::vector<Tensor> gs_ref = test::poisoned_states(H, p.storage, shape);
        const auto gsv_h = views(gs_ref);
        HistorySkipBackward b{.grad_out = grad_out.view(),
                              .states = sv_h,
                              .logits = in.logits.view(),
                              .weights = w_ref.view(),
                              .gate = in.gate.view(),
                              .grad_logits = gz_ref.view(),
                              .grad_gate = gg_ref.view(),
                              .grad_states = gsv_h};
        history_skip_backward(b, cfg, kRef);

        DeviceTensor dgz(coef, {H}), dgg(coef, {1});
        std::vector<DeviceTensor> dgs = device_outputs(H, p.storage, shape);
        const auto gsv_d = views(dgs);
        HistorySkipBackward d{.grad_out = dgrad_out.view(),
                              .states = sv_d,
                              .logits = dlogits.view(),
                              .weights = dw.view(),  // the CUDA forward's weights
                              .gate = dgate.view(),
                              .grad_logits = dgz.view(),
                              .grad_gate = dgg.view(),
                              .grad_states = gsv_d};
        const DeviceWorkspace ws(history_skip_backward_workspace_bytes(d, cfg, kCuda));
        d.workspace = ws.view();
        const double dot_tol = (p.stream == DType::f64 ? 1e-12 : 1e-5) * std::sqrt(8192.0);
        std::vector<Output> outs = {{"grad_logits", &gz_ref, &dgz, Tolerance::elementwise(dot_tol, dot_tol)},
                                    {"grad_gate", &gg_ref, &dgg, Tolerance::elementwise(dot_tol, dot_tol)}};
        for (int k = 0; k < H; ++k)
          outs.push_back({"grad_states", &gs_ref[k], &dgs[k],
                          Tolerance::elementwise(history_tol(p.storage), history_tol(p.storage))});
        check_outputs([&] { history_skip_backward(d, cfg, kCuda); }, outs, what + " history_skip_backward");
      }
}

TEST(CudaHistorySkip, AbsentGradStatesAreNotWritten) {
  // Detached states: absent gradient buffers; the present ones match the reference.
  MHC_REQUIRE_GPU();
  std::mt19937 rng(5);
  HistoryConfig cfg;
  cfg.constraint = Constraint::softmax;
  const std::vector<std::int64_t> shape{4096};
  const std::vector<Tensor> states = test::random_states(3, DType::f32, shape, rng);
  const Tensor logits = test::random_tensor(DType::f32, {3}, rng),
               grad_out = test::random_tensor(DType::f32, shape, rng);
  const Tensor x = test::random_tensor(DType::f32, shape, rng);
  Tensor w = poisoned_tensor(DType::f32, {3}), out = poisoned_tensor(DType::f32, shape);
  const auto sv_h = views(states);
  history_skip_forward({x.view(), sv_h, logits.view(), {}, out.view(), w.view()}, cfg, kRef);
  const std::vector<DeviceTensor> dstates = to_device(states);
  const DeviceTensor dlogits(logits), dw(w), dgrad_out(grad_out);
  const auto sv_d = views(dstates);
  std::vector<Tensor> gs_ref = test::poisoned_states(3, DType::f32, shape);
  std::vector<DeviceTensor> dgs = device_outputs(3, DType::f32, shape);
  std::vector<TensorView> gref = views(gs_ref), gdev = views(dgs);
  gref[1] = TensorView::absent();
  gdev[1] = TensorView::absent();
  Tensor gz_ref = poisoned_tensor(DType::f32, {3});
  DeviceTensor dgz(DType::f32, {3});
  HistorySkipBackward b{.grad_out = grad_out.view(),
                        .states = sv_h,
                        .logits = logits.view(),
                        .weights = w.view(),
                        .grad_logits = gz_ref.view(),
                        .grad_states = gref};
  history_skip_backward(b, cfg, kRef);
  b.grad_out = dgrad_out.view();
  b.states = sv_d;
  b.logits = dlogits.view();
  b.weights = dw.view();
  b.grad_logits = dgz.view();
  b.grad_states = gdev;
  const DeviceWorkspace ws(history_skip_backward_workspace_bytes(b, cfg, kCuda));
  b.workspace = ws.view();
  history_skip_backward(b, cfg, kCuda);
  MHC_CHECK_CUDA(cudaDeviceSynchronize());
  EXPECT_TRUE(test::close_elementwise("grad_logits", dgz.download(), gz_ref, 1e-4, 1e-4));
  EXPECT_TRUE(test::close_elementwise("grad_states[0]", dgs[0].download(), gs_ref[0], 1e-6, 1e-6));
  EXPECT_TRUE(test::close_elementwise("grad_states[2]", dgs[2].download(), gs_ref[2], 1e-6, 1e-6));
  const Tensor untouched = dgs[1].download();
  for (std::int64_t i = 0; i < untouched.numel(); ++i) ASSERT_TRUE(std::isnan(untouched.get(i))) << i;
}

TEST(CudaHistorySkip, OneHotSkipsZeroWeightStates) {
  // One-hot sparsemax weights: the states with weight 0 hold NaN and must not be read.
  MHC_REQUIRE_GPU();
  std::mt19937 rng(4);
  HistoryConfig cfg;
  std::vector<Tensor> states;
  for (int k = 0; k < 4; ++k)
    states.push_back(k == 2 ? test::random_tensor(DType::bf16, {8192}, rng) : poisoned_tensor(DType::bf16, {8192}));
  const Tensor x = test::random_tensor(DType::f32, {8192}, rng);
  Tensor logits(DType::f32, {4});
  const double z[4] = {0.0, -1.0, 3.0, 0.5};
  for (int k = 0; k < 4; ++k) logits.set(k, z[k]);
  const std::vector<DeviceTensor> dstates = to_device(states);
  const DeviceTensor dx(x), dlogits(logits);
  DeviceTensor dout(DType::f32, {8192}), dw(DType::f32, {4});
  const auto sv = views(dstates);
  history_skip_forward({dx.view(), sv, dlogits.view(), {}, dout.view(), dw.view()}, cfg, kCuda);
  MHC_CHECK_CUDA(cudaDeviceSynchronize());
  const Tensor out = dout.download(), w = dw.download();
  EXPECT_EQ(w.get(2), 1.0);
  for (std::int64_t i = 0; i < 8192; ++i)
    ASSERT_FLOAT_EQ(out.get(i), static_cast<float>(x.get(i) + states[2].get(i))) << i;
  const DeviceTensor dgrad_out(test::random_tensor(DType::f32, {8192}, rng));
  DeviceTensor dgz(DType::f32, {4});
  HistorySkipBackward b{.grad_out = dgrad_out.view(),
                        .states = sv,
                        .logits = dlogits.view(),
                        .weights = dw.view(),
                        .grad_logits = dgz.view()};
  const DeviceWorkspace ws(history_skip_backward_workspace_bytes(b, cfg, kCuda));
  b.workspace = ws.view();
  history_skip_backward(b, cfg, kCuda);
  MHC_CHECK_CUDA(cudaDeviceSynchronize());
  const Tensor gz = dgz.download();
  for (int k = 0; k < 4; ++k) EXPECT_EQ(gz.get(k), 0.0) << k;
}

}  // namespace
}  // namespace mhc::gpu_test
