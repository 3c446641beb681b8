// Every n-stream op on CUDA against the fp64 CPU reference, on fresh random inputs, with outputs
// NaN-poisoned before each run and every run repeated to check bit-identical results.
// Shapes cover the specialised stream counts (fused / packed kernels), the generic path (odd n,
// odd C, misaligned data, f64), tails of tiles and clusters, T = 0 and T = 1.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "cuda/pre_backward_split.hpp"
#include "cuda/tuning.hpp"
#include "gpu_harness.hpp"

namespace mhc::gpu_test {
namespace {

using std::int64_t;

struct Shape {
  int64_t T;
  int n;
  int64_t C;
  int offset = 0;  // elements: > 0 misaligns stream tensors (generic kernels)
};

std::string describe(DType d, const Shape& s) {
  return std::string(name(d)) + " T=" + std::to_string(s.T) + " n=" + std::to_string(s.n) + " C=" +
         std::to_string(s.C) + (s.offset ? " misaligned" : "");
}

// Parameters of a pre site with values that keep sigmoids and Sinkhorn away from saturation.
struct SiteParams {
  Tensor fn, base, scale;
};
SiteParams site_params(DType stream, int n, int64_t C, int rows, int scales) {
  const DType k = coef_of(stream);
  return {normal_tensor(k, {rows, n * C}, 1.0 / std::sqrt(double(n * C))), random_tensor(k, {rows}, -1.0, 1.0),
          random_tensor(k, {scales}, 0.5, 1.5)};
}

const std::vector<DType> kDtypes = quick() ? std::vector<DType>{DType::bf16, DType::f32, DType::f64}
                                           : std::vector<DType>{DType::f32, DType::f16, DType::bf16, DType::f64};

std::vector<Shape> site_shapes() {
  // 600 tokens of n = 4, C = 1024: more tiles than resident clusters, so the persistent,
  // double-buffered fused pre runs under the sanitizers too.
  if (quick()) return {{0, 4, 64}, {7, 4, 136}, {600, 4, 1024}, {33, 4, 1024, 1}, {7, 8, 512}, {70, 2, 200}, {5, 3, 37}};
  return {{0, 4, 64},   {1, 4, 1024},  {7, 4, 136},  {333, 4, 1000}, {1, 2, 64},   {70, 2, 200},
          {7, 8, 512},  {100, 8, 136}, {7, 1, 40},   {5, 3, 37},     {9, 32, 16},  {33, 4, 1024, 1},
          {17, 8, 64, 1}, {40, 4, 2048}, {3, 16, 24}};
}

// Sets an environment variable for the scope's duration (the CUDA backend reads its switches at every call).
class EnvScope {
 public:
  EnvScope(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) saved_ = old, had_ = true;
    setenv(name, value, 1);
  }
  ~EnvScope() {
    if (had_) setenv(name_.c_str(), saved_.c_str(), 1);
    else unsetenv(name_.c_str());
  }

 private:
  std::string name_, saved_;
  bool had_ = false;
};

// Selects the fast pre forward (MHC_CUDA_PRE: "stream", "direct", "ring", "wave", "fused" or "cluster") for the
// scope's duration.
class PrePathScope : EnvScope {
 public:
  explicit PrePathScope(const char* path) : EnvScope("MHC_CUDA_PRE", path) {}
};

// Loads a tuning table for the scope's duration (any device), then an empty one.
class TuningScope {
 public:
  explicit TuningScope(const std::string& entries) {
    const std::string err = cuda_impl::load_tuning_text(
        R"({"format": "mhc-tuning", "version": 1, "entries": [)" + entries + "]}", "");
    EXPECT_EQ(err, "");
  }
  ~TuningScope() { cuda_impl::load_tuning_text(R"({"format": "mhc-tuning", "version": 1, "entries": []})", ""); }
};

// ---- pre ----------------------------------------------------------------------------------------------
void run_pre(DType d, const Shape& s, bool with_fn, bool with_saved) {
  SCOPED_TRACE(describe(d, s) + (with_fn ? "" : " static") + (with_saved ? "" : " no-mixes"));
  const DType k = coef_of(d);
  const int n = s.n, m = n * n + 2 * n;
  MhcConfig cfg;
  cfg.n = n;
  Tensor x = normal_tensor(d, {s.T, n, s.C}, 1.0);
  SiteParams p = site_params(d, n, s.C, m, 3);
  Tensor li(d, {s.T, s.C}), hp(k, {s.T, n}), hpo(k, {s.T, n}), cb(k, {s.T, n, n}), mx(k, {s.T, m}), rs(k, {s.T});
  PreForward ref{x.view(), with_fn ? p.fn.view() : TensorView{}, p.base.view(), with_fn ? p.scale.view() : TensorView{},
                 li.view(), hp.view(), hpo.view(), cb.view(), with_saved ? mx.view() : TensorView{},
                 with_saved ? rs.view() : TensorView{}};
  pre_forward(ref, cfg, ref_ctx());

  DeviceTensor dx(x, s.offset), dfn(p.fn), dbase(p.base), dscale(p.scale);
  DeviceTensor dli(d, {s.T, s.C}, s.offset), dhp(k, {s.T, n}), dhpo(k, {s.T, n}), dcb(k, {s.T, n, n}),
      dmx(k, {s.T, m}), drs(k, {s.T});
  PreForward a{dx.view(), with_fn ? dfn.view() : TensorView{}, dbase.view(), with_fn ? dscale.view() : TensorView{},
               dli.view(), dhp.view(), dhpo.view(), dcb.view(), with_saved ? dmx.view() : TensorView{},
               with_saved ? drs.view() : TensorView{}};
  // the workspace the wave pre needs where it runs (MHC_CUDA_PRE=wave; 0 bytes elsewhere)
  const DeviceWorkspace ws(pre_forward_workspace_bytes(a, cfg, cuda_ctx()));
  a.workspace = ws.view();
  std::vector<Output> outs = {{"layer_input", &li, &dli, stream_tol(d)},
                              {"h_pre", &hp, &dhp, coef_tol(d)},
                              {"h_post", &hpo, &dhpo, coef_tol(d)},
                              {"comb", &cb, &dcb, coef_tol(d)}};
  if (with_saved) {
    outs.push_back({"mixes", &mx, &dmx, coef_tol(d)});
    outs.push_back({"rstd", &rs, &drs, coef_tol(d)});
  }
  check_outputs([&] { pre_forward(a, cfg, cuda_ctx()); }, outs, "pre_forward");
}

TEST(CudaPre, ForwardMatchesReference) {
  MHC_REQUIRE_GPU();
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) run_pre(d, s, true, true);
}

TEST(CudaPre, ForwardStaticAndWithoutSavedTensors) {
  MHC_REQUIRE_GPU();
  for (DType d : {DType::bf16, DType::f32}) {
    run_pre(d, {7, 4, 136}, false, true);
    run_pre(d, {33, 4, 256}, true, false);
    run_pre(d, {5, 3, 37}, false, false);
  }
}

TEST(CudaPre, ForwardLargeTile) {
  MHC_REQUIRE_GPU();
  if (quick()) GTEST_SKIP() << "quick mode";
  run_pre(DType::bf16, {4100, 4, 1024}, true, true);
  run_pre(DType::f16, {1030, 8, 1024}, true, true);
  run_pre(DType::bf16, {2051, 2, 512}, true, true);
}

// The shapes of the 16-bit projection kernels (wave, direct), both dtypes: one token and many, token counts that end
// inside a tile or a block's share, k-slices of one chunk to sixteen with a partial last one; and one call without
// mixes / rstd.
void run_projection_shapes() {
  const std::vector<Shape> shapes =
      quick() ? std::vector<Shape>{{1, 4, 64}, {70, 2, 200}, {600, 4, 1024}, {4300, 4, 1024}}
              : std::vector<Shape>{{1, 4, 64},     {7, 4, 136},    {70, 2, 200},   {333, 4, 1000}, {600, 4, 1024},
                                   {1, 4, 4096},   {129, 4, 4096}, {2051, 2, 512}, {4300, 4, 1024}, {1100, 4, 4096},
                                   {300, 4, 7168}, {9000, 2, 64}};
  for (DType d : {DType::bf16, DType::f16})
    for (const Shape& s : shapes) run_pre(d, s, true, true);
  run_pre(DType::bf16, {1500, 4, 1024}, true, false);
}

// The wave pre (MHC_CUDA_PRE=wave forces it wherever it can run: bf16/f16, n in {2, 4}): one wave and several, token
// counts that end inside a tile, a wave and a block's share, k-slices of one chunk to eight with a partial last one.
TEST(CudaPre, ForwardWaveKernelMatchesReference) {
  MHC_REQUIRE_GPU();
  const PrePathScope path("wave");
  run_projection_shapes();
  run_pre(DType::bf16, {600, 4, 1024}, false, true);  // static mode: the stream pre's fallbacks
}

// The direct projection (MHC_CUDA_PRE=direct forces it wherever it runs: bf16/f16, n in {2, 4}; the default from
// 1024 tokens): token counts that end inside a warp tile, one tile and many, k-slices of one chunk to sixteen with a
// partial last chunk and slice, slices halved for few tiles, and slice sizes forced by the tuning table.
TEST(CudaPre, ForwardDirectKernelMatchesReference) {
  MHC_REQUIRE_GPU();
  const PrePathScope path("direct");
  run_projection_shapes();
  run_pre(DType::bf16, {33, 4, 8}, true, true);  // rows too short to park a partial row: the fallbacks
  for (const char* table : {R"({"op": "pre_forward", "params": {"direct_ks": 256}})",
                            R"({"op": "pre_forward", "params": {"direct_ks": 64}})"}) {
    SCOPED_TRACE(table);
    const TuningScope tuning(table);
    run_pre(DType::bf16, {333, 4, 1000}, true, true);
    run_pre(DType::f16, {70, 2, 200}, true, true);
    run_pre(DType::bf16, {2100, 4, 4096}, true, true);
  }
}

// The direct projection with fragment-order loads (MHC_CUDA_DIRECT_LOADS=fragment; the default loads whole rows and
// shuffles them into fragments, ForwardDirectKernelMatchesReference): the same shapes.
TEST(CudaPre, ForwardDirectFragmentLoadsMatchReference) {
  MHC_REQUIRE_GPU();
  const PrePathScope path("direct");
  const EnvScope loads("MHC_CUDA_DIRECT_LOADS", "fragment");
  run_projection_shapes();
  const TuningScope tuning(R"({"op": "pre_forward", "params": {"direct_ks": 64}})");
  run_pre(DType::bf16, {2100, 4, 4096}, true, true);
}

// The cluster kernel stays selectable (MHC_CUDA_PRE=cluster) and correct.
TEST(CudaPre, ForwardClusterKernelMatchesReference) {
  MHC_REQUIRE_GPU();
  const PrePathScope path("cluster");
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) run_pre(d, s, true, true);
}

// ---- post -----------------------------------------------------------------------------------------------
void run_post(DType d, const Shape& s) {
  SCOPED_TRACE(describe(d, s));
  const DType k = coef_of(d);
  const int n = s.n;
  MhcConfig cfg;
  cfg.n = n;
  Tensor x = normal_tensor(d, {s.T, n, s.C}, 1.0), y = normal_tensor(d, {s.T, s.C}, 1.0);
  Tensor hpo = random_tensor(k, {s.T, n}, 0.0, 2.0), cb = random_tensor(k, {s.T, n, n}, 0.0, 1.0);
  Tensor xn(d, {s.T, n, s.C});
  post_forward({x.view(), y.view(), hpo.view(), cb.view(), xn.view()}, cfg, ref_ctx());
  DeviceTensor dx(x, s.offset), dy(y, s.offset), dhpo(hpo), dcb(cb), dxn(d, {s.T, n, s.C}, s.offset);
  check_outputs([&] { post_forward({dx.view(), dy.view(), dhpo.view(), dcb.view(), dxn.view()}, cfg, cuda_ctx()); },
                {{"x_next", &xn, &dxn, stream_tol(d)}}, "post_forward");

  // backward
  Tensor g = normal_tensor(d, {s.T, n, s.C}, 1.0);
  Tensor gx(d, {s.T, n, s.C}), gy(d, {s.T, s.C}), ghp(k, {s.T, n}), gcb(k, {s.T, n, n});
  post_backward({g.view(), x.view(), y.view(), hpo.view(), cb.view(), gx.view(), gy.view(), ghp.view(), gcb.view()}, cfg,
                ref_ctx());
  DeviceTensor dg(g, s.offset), dgx(d, {s.T, n, s.C}, s.offset), dgy(d, {s.T, s.C}), dghp(k, {s.T, n}),
      dgcb(k, {s.T, n, n});
  check_outputs(
      [&] {
        post_backward({dg.view(), dx.view(), dy.view(), dhpo.view(), dcb.view(), dgx.view(), dgy.view(), dghp.view(),
                       dgcb.view()},
                      cfg, cuda_ctx());
      },
      {{"grad_x", &gx, &dgx, stream_tol(d)},
       {"grad_y", &gy, &dgy, stream_tol(d)},
       {"grad_h_post", &ghp, &dghp, coef_tol(d)},
       {"grad_comb", &gcb, &dgcb, coef_tol(d)}},
      "post_backward");
}

TEST(CudaPost, ForwardAndBackwardMatchReference) {
  MHC_REQUIRE_GPU();
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) run_post(d, s);
}

// ---- post + pre -------------------------------------------------------------------------------------------
// x_next is judged against the reference post+pre; the outputs of the pre part against the reference pre
// of the x_next this op stored (what the op specifies: pre reads x_next as stored), so that a bf16 rounding
// flip of x_next between fp32 and fp64 arithmetic does not count as a projection error.
void run_post_pre(DType d, const Shape& s) {
  SCOPED_TRACE(describe(d, s));
  const DType k = coef_of(d);
  const int n = s.n, m = n * n + 2 * n;
  MhcConfig cfg;
  cfg.n = n;
  Tensor x = normal_tensor(d, {s.T, n, s.C}, 1.0), y = normal_tensor(d, {s.T, s.C}, 1.0);
  Tensor hpo = random_tensor(k, {s.T, n}, 0.0, 2.0), cb = random_tensor(k, {s.T, n, n}, 0.0, 1.0);
  SiteParams p = site_params(d, n, s.C, m, 3);
  Tensor xn(d, {s.T, n, s.C}), li(d, {s.T, s.C}), hp(k, {s.T, n}), hpn(k, {s.T, n}), cbn(k, {s.T, n, n}),
      mx(k, {s.T, m}), rs(k, {s.T});
  post_pre_forward({x.view(), y.view(), hpo.view(), cb.view(), p.fn.view(), p.base.view(), p.scale.view(), xn.view(),
                    li.view(), hp.view(), hpn.view(), cbn.view(), mx.view(), rs.view()},
                   cfg, ref_ctx());
  DeviceTensor dx(x, s.offset), dy(y, s.offset), dhpo(hpo), dcb(cb), dfn(p.fn), dbase(p.base), dscale(p.scale);
  DeviceTensor dxn(d, {s.T, n, s.C}, s.offset), dli(d, {s.T, s.C}, s.offset), dhp(k, {s.T, n}), dhpn(k, {s.T, n}),
      dcbn(k, {s.T, n, n}), dmx(k, {s.T, m}), drs(k, {s.T});
  PostPreForward a{dx.view(),  dy.view(),  dhpo.view(), dcb.view(),  dfn.view(), dbase.view(), dscale.view(),
                   dxn.view(), dli.view(), dhp.view(),  dhpn.view(), dcbn.view(), dmx.view(),  drs.view()};
  const DeviceWorkspace ws(post_pre_forward_workspace_bytes(a, cfg, cuda_ctx()));
  a.workspace = ws.view();
  auto cuda_run = [&] { post_pre_forward(a, cfg, cuda_ctx()); };
  cuda_run();
  Tensor stored = dxn.download();
  for (DeviceTensor* out : {&dxn, &dli, &dhp, &dhpn, &dcbn, &dmx, &drs}) out->poison();
  pre_forward({stored.view(), p.fn.view(), p.base.view(), p.scale.view(), li.view(), hp.view(), hpn.view(), cbn.view(),
               mx.view(), rs.view()},
              cfg, ref_ctx());
  check_outputs(cuda_run,
                {{"x_next", &xn, &dxn, stream_tol(d)},
                 {"layer_input", &li, &dli, stream_tol(d)},
                 {"h_pre", &hp, &dhp, coef_tol(d)},
                 {"h_post_next", &hpn, &dhpn, coef_tol(d)},
                 {"comb_next", &cbn, &dcbn, coef_tol(d)},
                 {"mixes", &mx, &dmx, coef_tol(d)},
                 {"rstd", &rs, &drs, coef_tol(d)}},
                "post_pre_forward");
}

TEST(CudaPostPre, ForwardMatchesReference) {
  MHC_REQUIRE_GPU();
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) run_post_pre(d, s);
}

TEST(CudaPostPre, ForwardClusterKernelMatchesReference) {
  MHC_REQUIRE_GPU();
  const PrePathScope path("cluster");
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) run_post_pre(d, s);
}

// Unfused post+pre (above 16 tokens) running the wave pre on the stored x_next.
TEST(CudaPostPre, ForwardWaveKernelMatchesReference) {
  MHC_REQUIRE_GPU();
  const PrePathScope path("wave");
  for (DType d : {DType::bf16, DType::f16})
    for (const Shape& s : std::vector<Shape>{{7, 4, 136}, {70, 2, 200}, {600, 4, 1024}, {1100, 4, 4096}})
      run_post_pre(d, s);
}

// Post+pre fused into the direct projection (MHC_CUDA_PRE=direct at every size; the default from 1024 tokens, n in
// {2, 4}): x_next computed, stored and projected by the same lanes; tails of tokens, channels and slices.
TEST(CudaPostPre, ForwardDirectKernelMatchesReference) {
  MHC_REQUIRE_GPU();
  const PrePathScope path("direct");
  const std::vector<Shape> shapes =
      quick() ? std::vector<Shape>{{7, 4, 136}, {70, 2, 200}, {1100, 4, 4096}}
              : std::vector<Shape>{{1, 4, 64},     {7, 4, 136},     {33, 4, 8},      {70, 2, 200},   {600, 4, 1000},
                                   {1100, 4, 4096}, {2051, 2, 512}, {4300, 4, 1024}, {300, 4, 7168}};
  for (DType d : {DType::bf16, DType::f16})
    for (const Shape& s : shapes) run_post_pre(d, s);
  const TuningScope tuning(R"({"op": "post_pre_forward", "params": {"direct_ks": 256}})");
  run_post_pre(DType::bf16, {333, 4, 1000});
  run_post_pre(DType::f16, {2100, 2, 4096});
}

// The streaming post+pre fused at every size (the default fuses it only for few tokens).
TEST(CudaPostPre, ForwardFusedStreamKernelMatchesReference) {
  MHC_REQUIRE_GPU();
  const PrePathScope path("fused");
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) run_post_pre(d, s);
}

TEST(CudaPostPre, ForwardLargeTile) {
  MHC_REQUIRE_GPU();
  if (quick()) GTEST_SKIP() << "quick mode";
  for (const char* path : {"stream", "ring", "fused"}) {
    SCOPED_TRACE(path);
    const PrePathScope scope(path);
    run_post_pre(DType::bf16, {4100, 4, 1024});
    run_post_pre(DType::f16, {1030, 8, 1024});
  }
}

// The streaming kernels under forced work splits: runs of one chunk (many partial rows per tile,
// several threads summing a pair), runs spanning tiles, 16-token tiles on many tokens, 64- and 128-token
// tiles on few, 2-, 4- and 8-token groups, and channel slices (one copy of the partials per slice).
TEST(CudaPre, StreamWorkSplitsMatchReference) {
  MHC_REQUIRE_GPU();
  const std::vector<std::string> tables = {
      R"({"op": "pre_forward", "params": {"stream_chunks": 1, "stream_group": 2}},
         {"op": "post_pre_forward", "params": {"stream_chunks": 1, "stream_group": 2}})",
      R"({"op": "pre_forward", "params": {"stream_chunks": 7, "stream_tile": 16, "stream_slices": 3}},
         {"op": "post_pre_forward", "params": {"stream_chunks": 7, "stream_tile": 16, "stream_slices": 3}})",
      R"({"op": "pre_forward", "params": {"stream_chunks": 1000000, "stream_tile": 64, "stream_group": 8}},
         {"op": "post_pre_forward", "params": {"stream_chunks": 1000000, "stream_tile": 64, "stream_group": 8}})",
      R"({"op": "pre_forward", "params": {"stream_chunks": 3, "stream_slices": 8}},
         {"op": "post_pre_forward", "params": {"stream_chunks": 3, "stream_slices": 8}})",
      R"({"op": "pre_forward", "params": {"stream_tile": 128, "stream_chunks": 5, "stream_group": 4}},
         {"op": "post_pre_forward", "params": {"stream_tile": 128, "stream_chunks": 5, "stream_group": 4}})"};
  const std::vector<Shape> shapes = quick() ? std::vector<Shape>{{70, 4, 1000}, {9, 8, 512}}
                                            : std::vector<Shape>{{70, 4, 1000}, {9, 8, 512}, {1, 4, 4096},
                                                                 {131, 2, 200}, {300, 8, 1024}};
  const PrePathScope path("fused");  // post_pre_forward's table entries apply to the fused kernel
  for (const std::string& table : tables) {
    SCOPED_TRACE(table);
    const TuningScope tuning(table);
    for (DType d : {DType::bf16, DType::f16})
      for (const Shape& s : shapes) {
        run_pre(d, s, true, true);
        run_post_pre(d, s);
      }
  }
}

// ---- pre backward ----------------------------------------------------------------------------------------------
struct GradMask {
  bool layer_input = true, h_pre = true, h_post = true, comb = true, accum = true, fn = true;
};

// versions: the stage-C versions (MHC_CUDA_PRE_BWD) to run on the same inputs, each against the reference and
// twice into poisoned outputs; with two or more, every version's outputs are also compared with the first's
// (grad_x to bf16 rounding, grad_fn to the error of the tensor-core split). Empty: the default version.
// results (optional): every version's outputs (grad_x, grad_base, then grad_fn, grad_scale with fn).
void run_pre_backward(DType d, const Shape& s, GradMask gm, const std::vector<const char*>& versions = {},
                      std::vector<std::vector<Tensor>>* results = nullptr) {
  SCOPED_TRACE(describe(d, s) + (gm.fn ? "" : " static") + (gm.comb ? "" : " no-grad-comb") +
               (gm.layer_input ? "" : " no-grad-layer-input") + (gm.accum ? "" : " no-accum"));
  const DType k = coef_of(d);
  const int n = s.n, m = n * n + 2 * n;
  MhcConfig cfg;
  cfg.n = n;
  Tensor x = normal_tensor(d, {s.T, n, s.C}, 1.0);
  SiteParams p = site_params(d, n, s.C, m, 3);
  TensorView fn_v = gm.fn ? p.fn.view() : TensorView{}, scale_v = gm.fn ? p.scale.view() : TensorView{};
  // saved tensors from the reference forward
  Tensor li(d, {s.T, s.C}), hp(k, {s.T, n}), hpo(k, {s.T, n}), cb(k, {s.T, n, n}), mx(k, {s.T, m}), rs(k, {s.T});
  pre_forward({x.view(), fn_v, p.base.view(), scale_v, li.view(), hp.view(), hpo.view(), cb.view(), mx.view(), rs.view()},
              cfg, ref_ctx());
  Tensor gli = normal_tensor(d, {s.T, s.C}, 1.0), ghp = normal_tensor(k, {s.T, n}, 1.0),
             ghpo = normal_tensor(k, {s.T, n}, 1.0), gcb = normal_tensor(k, {s.T, n, n}, 1.0),
             acc = normal_tensor(d, {s.T, n, s.C}, 1.0);
  Tensor gx(d, {s.T, n, s.C}), gfn(k, {m, n * s.C}), gbase(k, {m}), gscale(k, {3});
  auto opt = [](bool on, Tensor& t) { return on ? t.view() : TensorView{}; };
  PreBackward ref{x.view(), fn_v, p.base.view(), scale_v, mx.view(), rs.view(), opt(gm.layer_input, gli),
                  opt(gm.h_pre, ghp), opt(gm.h_post, ghpo), opt(gm.comb, gcb), opt(gm.accum, acc), gx.view(),
                  opt(gm.fn, gfn), gbase.view(), opt(gm.fn, gscale), TensorView{}};
  pre_backward(ref, cfg, ref_ctx());

  DeviceTensor dx(x, s.offset), dfn(p.fn), dbase(p.base), dscale(p.scale), dmx(mx), drs(rs);
  DeviceTensor dgli(gli, s.offset), dghp(ghp), dghpo(ghpo), dgcb(gcb), dacc(acc, s.offset);
  DeviceTensor dgx(d, {s.T, n, s.C}, s.offset), dgfn(k, {m, n * s.C}), dgbase(k, {m}), dgscale(k, {3});
  auto dopt = [](bool on, DeviceTensor& t) { return on ? t.view() : TensorView{}; };
  PreBackward a{dx.view(), gm.fn ? dfn.view() : TensorView{}, dbase.view(), gm.fn ? dscale.view() : TensorView{},
                dmx.view(), drs.view(), dopt(gm.layer_input, dgli), dopt(gm.h_pre, dghp), dopt(gm.h_post, dghpo),
                dopt(gm.comb, dgcb), dopt(gm.accum, dacc), dgx.view(), dopt(gm.fn, dgfn), dgbase.view(),
                dopt(gm.fn, dgscale), TensorView{}};
  const std::size_t ws_bytes = pre_backward_workspace_bytes(a, cfg, cuda_ctx());
  const DeviceWorkspace ws(ws_bytes);
  a.workspace = ws.view();
  std::vector<Output> outs = {{"grad_x", &gx, &dgx, stream_tol(d)}, {"grad_base", &gbase, &dgbase, coef_tol(d)}};
  if (gm.fn) {
    outs.push_back({"grad_fn", &gfn, &dgfn, coef_tol(d)});
    outs.push_back({"grad_scale", &gscale, &dgscale, coef_tol(d)});
  }
  if (versions.empty()) {
    check_outputs([&] { pre_backward(a, cfg, cuda_ctx()); }, outs, "pre_backward");
    return;
  }
  std::vector<std::vector<Tensor>> got;
  for (const char* v : versions) {
    const EnvScope version("MHC_CUDA_PRE_BWD", v);
    // the workspace query runs under the version too (it must fit whichever version runs)
    ASSERT_LE(pre_backward_workspace_bytes(a, cfg, cuda_ctx()), ws_bytes) << v;
    check_outputs([&] { pre_backward(a, cfg, cuda_ctx()); }, outs, std::string("pre_backward ") + v);
    got.emplace_back();
    for (const Output& o : outs) got.back().push_back(o.dev->download());
  }
  for (size_t v = 1; v < versions.size(); ++v)
    for (size_t i = 0; i < outs.size(); ++i) {
      const double tol = i == 0 ? (d == DType::bf16 ? 1e-2 : stream_tol(d)) : 1e-3;
      const double err = rel_error(got[v][i], got[0][i]);
      EXPECT_LE(err, tol) << versions[v] << " vs " << versions[0] << ": " << outs[i].name << " rel difference " << err;
    }
  if (results) *results = std::move(got);
}

TEST(CudaPre, BackwardMatchesReference) {
  MHC_REQUIRE_GPU();
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) run_pre_backward(d, s, {});
}

TEST(CudaPre, BackwardPartialGradsAndStatic) {
  MHC_REQUIRE_GPU();
  for (DType d : {DType::bf16, DType::f32, DType::f64}) {
    GradMask only_li;
    only_li.h_pre = only_li.h_post = only_li.comb = only_li.accum = false;
    run_pre_backward(d, {9, 4, 64}, only_li);
    GradMask no_li;
    no_li.layer_input = false;
    run_pre_backward(d, {9, 4, 64}, no_li);
    GradMask stat;
    stat.fn = false;
    run_pre_backward(d, {9, 4, 64}, stat);
    run_pre_backward(d, {5, 3, 37}, stat);
  }
}

// Stage C v4 (MHC_CUDA_PRE_BWD=v4 and v4-wide) against the reference and v2 on the same inputs. v4 takes bf16 with
// n in {2, 4, 8}, C % 8 == 0 and aligned data (static mode: any 16-bit or f32 stream in packs); the rest falls
// back to v2, so both sides of each boundary are here: C = 4104 and 1000 (blocks across streams, a partial last
// block) vs 1004 and 37, n = 3, misaligned data, f16 / f32 with fn. T = 0, 1, 7, 333 and 4096 (many chunks).
TEST(CudaPreBwdV4, MatchesReferenceAndV2) {
  MHC_REQUIRE_GPU();
  const std::vector<const char*> both = {"v2", "v4", "v4-wide", "v5"};
  const std::vector<Shape> bf16_shapes =
      quick() ? std::vector<Shape>{{0, 4, 256}, {7, 4, 1000}, {333, 8, 136}, {4096, 4, 256}, {33, 2, 200}, {5, 3, 40}}
              : std::vector<Shape>{{0, 4, 256},    {1, 4, 4096},   {7, 4, 4096},  {333, 4, 1000}, {333, 4, 4104},
                                   {4096, 4, 256}, {7, 4, 1004},   {9, 4, 37},    {1, 2, 512},    {333, 2, 200},
                                   {4096, 2, 512}, {7, 8, 512},    {333, 8, 136}, {4096, 8, 64},  {4096, 8, 128},
                                   {7, 3, 40},     {33, 4, 1024, 1}, {17, 8, 64, 1}};
  for (const Shape& s : bf16_shapes) run_pre_backward(DType::bf16, s, {}, both);
  // partial gradients: no accum, no grad_layer_input (no g, no h), static mode with and without accum
  GradMask no_accum;
  no_accum.accum = false;
  GradMask no_li;
  no_li.layer_input = false;
  GradMask stat;
  stat.fn = false;
  GradMask stat_no_accum = stat;
  stat_no_accum.accum = false;
  for (const Shape& s : {Shape{333, 4, 1000}, Shape{70, 8, 512}, Shape{1, 2, 64}}) {
    run_pre_backward(DType::bf16, s, no_accum, both);
    run_pre_backward(DType::bf16, s, no_li, both);
  }
  for (DType d : {DType::bf16, DType::f16, DType::f32})
    for (const Shape& s : {Shape{333, 4, 1000}, Shape{7, 3, 40}, Shape{5, 3, 37}, Shape{9, 4, 64, 1}}) {
      run_pre_backward(d, s, stat, both);
      run_pre_backward(d, s, stat_no_accum, both);
    }
  // f16 / f32 / f64 with fn: v4 falls back to v2
  for (DType d : {DType::f16, DType::f32, DType::f64}) run_pre_backward(d, {33, 4, 256}, {}, both);
}

// ---- pre backward, split stage C (MHC_CUDA_PRE_BWD=split, split-u4) -------------------------------------------
// The split version against the reference and v2 on the same inputs (run_pre_backward: poisoned outputs, two runs
// bit-identical, the workspace of the default query), and which path ran: a fallback shape runs v2 under both
// settings (bit-identical outputs); a supported one sums grad_fn in another order (other chunks, other tiles), so
// its bits differ somewhere in the m * nC values.
void run_split(DType d, const Shape& s, GradMask gm, const char* version = "split") {
  SCOPED_TRACE(version);
  std::vector<std::vector<Tensor>> got;
  run_pre_backward(d, s, gm, {"v2", version}, &got);
  if (got.size() != 2) return;  // a fatal failure inside
  const bool split_runs = cuda_impl::pre_bwd_split_shape_ok(d, s.n, s.C) && s.offset == 0 && s.T > 0;
  if (!split_runs)
    for (size_t i = 0; i < got[0].size(); ++i)
      EXPECT_TRUE(bit_identical(got[1][i], got[0][i])) << "fallback shape, yet output " << i << " differs from v2";
  if (split_runs && gm.fn && s.T >= 256)
    EXPECT_FALSE(bit_identical(got[1][2], got[0][2])) << "grad_fn bit-identical to v2: did the split path run?";
}

std::vector<Shape> split_shapes() {
  // supported: bf16, n in {2, 4, 8}, C % 8 == 0, aligned; the rest falls back to v2
  if (quick())
    return {{0, 4, 64}, {1, 4, 1024}, {333, 4, 1000}, {7, 8, 512}, {70, 2, 200}, {33, 4, 100}, {7, 3, 64},
            {33, 4, 1024, 1}};
  return {{0, 4, 64},     {1, 4, 1024},    {7, 4, 136},  {333, 4, 1000}, {4096, 4, 512}, {1, 2, 64},
          {333, 2, 200},  {4096, 2, 1024}, {7, 8, 512},  {333, 8, 136},  {4096, 8, 256}, {1, 8, 8},
          // fallback: n = 3, C not a multiple of 8 (odd and even), misaligned
          {7, 3, 64},     {333, 3, 40},    {7, 4, 100},  {33, 4, 37},    {9, 8, 12},     {70, 2, 36},
          {33, 4, 1024, 1}};
}

TEST(CudaPreBackwardSplit, MatchesReferenceAndV2) {
  MHC_REQUIRE_GPU();
  for (const Shape& s : split_shapes()) run_split(DType::bf16, s, {});
}

TEST(CudaPreBackwardSplit, PartialGradsAndStatic) {
  MHC_REQUIRE_GPU();
  GradMask no_accum;
  no_accum.accum = false;
  GradMask no_li;
  no_li.layer_input = false;
  GradMask stat;
  stat.fn = false;
  GradMask stat_no_accum = stat;
  stat_no_accum.accum = false;
  GradMask only_li;
  only_li.h_pre = only_li.h_post = only_li.comb = only_li.accum = false;
  const std::vector<Shape> shapes = quick() ? std::vector<Shape>{{333, 4, 1000}, {7, 8, 512}, {7, 3, 64}}
                                            : std::vector<Shape>{{1, 4, 1024}, {333, 4, 1000}, {4096, 4, 512},
                                                                 {70, 2, 200}, {7, 8, 512},    {333, 8, 136},
                                                                 {7, 3, 64},   {33, 4, 37}};
  for (const Shape& s : shapes)
    for (const GradMask& gm : {no_accum, no_li, stat, stat_no_accum, only_li}) run_split(DType::bf16, s, gm);
}

// The 4-token-step variant of the grad_x kernel (n <= 4; n = 8 runs the default steps).
TEST(CudaPreBackwardSplit, FourTokenStepsMatchReferenceAndV2) {
  MHC_REQUIRE_GPU();
  GradMask no_accum;
  no_accum.accum = false;
  GradMask no_li;
  no_li.layer_input = false;
  const std::vector<Shape> shapes = quick() ? std::vector<Shape>{{333, 4, 1000}, {33, 2, 200}}
                                            : std::vector<Shape>{{1, 4, 1024}, {7, 4, 136},  {333, 4, 1000},
                                                                 {4096, 4, 512}, {333, 2, 200}, {7, 8, 512},
                                                                 {33, 4, 37}};
  for (const Shape& s : shapes)
    for (const GradMask& gm : {GradMask{}, no_accum, no_li}) run_split(DType::bf16, s, gm, "split-u4");
}

// Other stream dtypes take v2 under MHC_CUDA_PRE_BWD=split (bit-identical to it).
TEST(CudaPreBackwardSplit, OtherDtypesFallBack) {
  MHC_REQUIRE_GPU();
  GradMask stat;
  stat.fn = false;
  for (DType d : {DType::f16, DType::f32, DType::f64}) {
    run_split(d, {33, 4, 136}, {});
    run_split(d, {7, 8, 64}, stat);
  }
}

// ---- Sinkhorn ----------------------------------------------------------------------------------------------------
void run_sinkhorn(DType k, int64_t T, int n, int iters) {
  SCOPED_TRACE(std::string(name(k)) + " T=" + std::to_string(T) + " n=" + std::to_string(n) + " iters=" +
               std::to_string(iters));
  MhcConfig cfg;
  cfg.n = n;
  cfg.iters = iters;
  Tensor l = normal_tensor(k, {T, n, n}, 1.0), c(k, {T, n, n});
  sinkhorn_forward({l.view(), c.view()}, cfg, ref_ctx());
  DeviceTensor dl(l), dc(k, {T, n, n});
  check_outputs([&] { sinkhorn_forward({dl.view(), dc.view()}, cfg, cuda_ctx()); }, {{"comb", &c, &dc, coef_tol(k)}},
                "sinkhorn_forward");
  Tensor g = normal_tensor(k, {T, n, n}, 1.0), gl(k, {T, n, n});
  sinkhorn_backward({l.view(), g.view(), gl.view()}, cfg, ref_ctx());
  DeviceTensor dg(g), dgl(k, {T, n, n});
  check_outputs([&] { sinkhorn_backward({dl.view(), dg.view(), dgl.view()}, cfg, cuda_ctx()); },
                {{"grad_logits", &gl, &dgl, coef_tol(k)}}, "sinkhorn_backward");
}

TEST(CudaSinkhorn, ForwardAndBackwardMatchReference) {
  MHC_REQUIRE_GPU();
  for (DType k : {DType::f32, DType::f64})
    for (int n : {1, 2, 3, 4, 8, 32})
      for (int64_t T : {int64_t(0), int64_t(1), int64_t(7), int64_t(300)}) run_sinkhorn(k, T, n, 20);
  run_sinkhorn(DType::f32, 50, 4, 1);
  run_sinkhorn(DType::f32, 50, 8, 200);
  run_sinkhorn(DType::f32, 3, 64, 5);
}

// ---- expand -------------------------------------------------------------------------------------------------------
TEST(CudaExpand, ForwardAndBackwardMatchReference) {
  MHC_REQUIRE_GPU();
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) {
      SCOPED_TRACE(describe(d, s));
      MhcConfig cfg;
      cfg.n = s.n;
      Tensor x = normal_tensor(d, {s.T, s.C}, 1.0), out(d, {s.T, s.n, s.C});
      expand_forward({x.view(), out.view()}, cfg, ref_ctx());
      DeviceTensor dx(x, s.offset), dout(d, {s.T, s.n, s.C}, s.offset);
      check_outputs([&] { expand_forward({dx.view(), dout.view()}, cfg, cuda_ctx()); },
                    {{"out", &out, &dout, stream_tol(d)}}, "expand_forward");
      Tensor g = normal_tensor(d, {s.T, s.n, s.C}, 1.0), gx(d, {s.T, s.C});
      expand_backward({g.view(), gx.view()}, cfg, ref_ctx());
      DeviceTensor dg(g, s.offset), dgx(d, {s.T, s.C}, s.offset);
      check_outputs([&] { expand_backward({dg.view(), dgx.view()}, cfg, cuda_ctx()); },
                    {{"grad_x", &gx, &dgx, stream_tol(d)}}, "expand_backward");
    }
}

// ---- head -----------------------------------------------------------------------------------------------------------
void run_head(DType d, const Shape& s, bool with_fn) {
  SCOPED_TRACE(describe(d, s) + (with_fn ? "" : " static"));
  const DType k = coef_of(d);
  const int n = s.n;
  MhcConfig cfg;
  cfg.n = n;
  Tensor x = normal_tensor(d, {s.T, n, s.C}, 1.0);
  SiteParams p = site_params(d, n, s.C, n, 1);
  TensorView fn_v = with_fn ? p.fn.view() : TensorView{}, sc_v = with_fn ? p.scale.view() : TensorView{};
  Tensor out(d, {s.T, s.C}), w(k, {s.T, n}), mx(k, {s.T, n}), rs(k, {s.T});
  head_forward({x.view(), fn_v, p.base.view(), sc_v, out.view(), w.view(), mx.view(), rs.view()}, cfg, ref_ctx());
  DeviceTensor dx(x, s.offset), dfn(p.fn), dbase(p.base), dscale(p.scale);
  DeviceTensor dout(d, {s.T, s.C}, s.offset), dw(k, {s.T, n}), dmx(k, {s.T, n}), drs(k, {s.T});
  check_outputs(
      [&] {
        head_forward({dx.view(), with_fn ? dfn.view() : TensorView{}, dbase.view(),
                      with_fn ? dscale.view() : TensorView{}, dout.view(), dw.view(), dmx.view(), drs.view()},
                     cfg, cuda_ctx());
      },
      {{"out", &out, &dout, stream_tol(d)},
       {"weights", &w, &dw, coef_tol(d)},
       {"mixes", &mx, &dmx, coef_tol(d)},
       {"rstd", &rs, &drs, coef_tol(d)}},
      "head_forward");

  Tensor go = normal_tensor(d, {s.T, s.C}, 1.0), gw = normal_tensor(k, {s.T, n}, 1.0);
  Tensor gx(d, {s.T, n, s.C}), gfn(k, {n, n * s.C}), gbase(k, {n}), gscale(k, {1});
  HeadBackward ref{x.view(), fn_v, p.base.view(), sc_v, mx.view(), rs.view(), go.view(), gw.view(), gx.view(),
                   with_fn ? gfn.view() : TensorView{}, gbase.view(), with_fn ? gscale.view() : TensorView{},
                   TensorView{}};
  head_backward(ref, cfg, ref_ctx());
  // The backward gets the reference forward's saved tensors (as the pre test does), so it is judged
  // on its own accuracy: grad_scale is a sum over tokens with cancellation that would magnify the
  // forward's rounding differences in mixes.
  DeviceTensor dmx_saved(mx), drs_saved(rs);
  DeviceTensor dgo(go, s.offset), dgw(gw), dgx(d, {s.T, n, s.C}, s.offset), dgfn(k, {n, n * s.C}), dgbase(k, {n}),
      dgscale(k, {1});
  HeadBackward a{dx.view(), with_fn ? dfn.view() : TensorView{}, dbase.view(), with_fn ? dscale.view() : TensorView{},
                 dmx_saved.view(), drs_saved.view(), dgo.view(), dgw.view(), dgx.view(), with_fn ? dgfn.view() : TensorView{},
                 dgbase.view(), with_fn ? dgscale.view() : TensorView{}, TensorView{}};
  const DeviceWorkspace ws(head_backward_workspace_bytes(a, cfg, cuda_ctx()));
  a.workspace = ws.view();
  std::vector<Output> outs = {{"grad_x", &gx, &dgx, stream_tol(d)}, {"grad_base", &gbase, &dgbase, coef_tol(d)}};
  if (with_fn) {
    outs.push_back({"grad_fn", &gfn, &dgfn, coef_tol(d)});
    // grad_scale is one number, a sum over T * n fp32 terms that cancel: its relative error can pass 1e-4 at
    // some random inputs (1.1e-4 seen at bf16, T = 33, n = 4, C = 1024) although every term is right.
    outs.push_back({"grad_scale", &gscale, &dgscale, 10 * coef_tol(d)});
  }
  check_outputs([&] { head_backward(a, cfg, cuda_ctx()); }, outs, "head_backward");
}

TEST(CudaHead, ForwardAndBackwardMatchReference) {
  MHC_REQUIRE_GPU();
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) run_head(d, s, true);
  run_head(DType::bf16, {7, 4, 64}, false);
}

// ---- residual_add_agg ------------------------------------------------------------------------------------------------
TEST(CudaResidualAddAgg, ForwardAndBackwardMatchReference) {
  MHC_REQUIRE_GPU();
  for (DType d : kDtypes)
    for (const Shape& s : site_shapes()) {
      SCOPED_TRACE(describe(d, s));
      const DType k = coef_of(d);
      MhcConfig cfg;
      cfg.n = s.n;
      Tensor x = normal_tensor(d, {s.T, s.n, s.C}, 1.0), r = normal_tensor(d, {s.T, s.n, s.C}, 1.0),
                 hp = random_tensor(k, {s.T, s.n}, 0.0, 1.0);
      Tensor xo(d, {s.T, s.n, s.C}), agg(d, {s.T, s.C});
      residual_add_agg_forward({x.view(), r.view(), hp.view(), xo.view(), agg.view()}, cfg, ref_ctx());
      DeviceTensor dx(x, s.offset), dr(r, s.offset), dhp(hp), dxo(d, {s.T, s.n, s.C}, s.offset), dagg(d, {s.T, s.C});
      check_outputs(
          [&] { residual_add_agg_forward({dx.view(), dr.view(), dhp.view(), dxo.view(), dagg.view()}, cfg, cuda_ctx()); },
          {{"x_out", &xo, &dxo, stream_tol(d)}, {"agg", &agg, &dagg, stream_tol(d)}}, "residual_add_agg_forward");
      for (int present = 0; present < 3; ++present) {  // both grads, only grad_agg, only grad_x_out
        Tensor gxo = normal_tensor(d, {s.T, s.n, s.C}, 1.0), gagg = normal_tensor(d, {s.T, s.C}, 1.0);
        Tensor gs(d, {s.T, s.n, s.C}), ghp(k, {s.T, s.n});
        const bool has_gxo = present != 1, has_gagg = present != 2;
        residual_add_agg_backward({has_gxo ? gxo.view() : TensorView{}, has_gagg ? gagg.view() : TensorView{},
                                   xo.view(), hp.view(), gs.view(), ghp.view()},
                                  cfg, ref_ctx());
        DeviceTensor dgxo(gxo, s.offset), dgagg(gagg), dxo_in(xo, s.offset), dgs(d, {s.T, s.n, s.C}, s.offset),
            dghp(k, {s.T, s.n});
        check_outputs(
            [&] {
              residual_add_agg_backward({has_gxo ? dgxo.view() : TensorView{}, has_gagg ? dgagg.view() : TensorView{},
                                         dxo_in.view(), dhp.view(), dgs.view(), dghp.view()},
                                        cfg, cuda_ctx());
            },
            {{"grad_sum", &gs, &dgs, stream_tol(d)}, {"grad_h_pre", &ghp, &dghp, coef_tol(d)}},
            "residual_add_agg_backward");
      }
    }
}

// ---- NaN policy, streams, graphs -------------------------------------------------------------------------------------
TEST(CudaOps, NanPolicyCheckFindsNonFiniteInput) {
  MHC_REQUIRE_GPU();
  MhcConfig cfg;
  cfg.n = 4;
  cfg.nan_policy = NanPolicy::check;
  Tensor x = normal_tensor(DType::bf16, {3, 4, 64}, 1.0), y = normal_tensor(DType::bf16, {3, 64}, 1.0);
  Tensor hpo = random_tensor(DType::f32, {3, 4}, 0, 1), cb = random_tensor(DType::f32, {3, 4, 4}, 0, 1);
  x.set(100, NAN);
  DeviceTensor dx(x), dy(y), dhpo(hpo), dcb(cb), dxn(DType::bf16, {3, 4, 64});
  EXPECT_THROW(post_forward({dx.view(), dy.view(), dhpo.view(), dcb.view(), dxn.view()}, cfg, cuda_ctx()),
               NonFiniteError);
  x.set(100, 1.0);
  dx.upload(x);
  EXPECT_NO_THROW(post_forward({dx.view(), dy.view(), dhpo.view(), dcb.view(), dxn.view()}, cfg, cuda_ctx()));
}

// A whole site (pre, then post) captured in a CUDA graph on a non-default stream and replayed:
// no host synchronisation inside the ops, same results as eager launches.
TEST(CudaOps, SiteRunsInsideCudaGraphCapture) {
  MHC_REQUIRE_GPU();
  const int n = 4;
  const int64_t T = 37, C = 256, m = n * n + 2 * n;
  MhcConfig cfg;
  cfg.n = n;
  Tensor x = normal_tensor(DType::bf16, {T, n, C}, 1.0), y = normal_tensor(DType::bf16, {T, C}, 1.0);
  SiteParams p = site_params(DType::bf16, n, C, m, 3);
  DeviceTensor dx(x), dy(y), dfn(p.fn), dbase(p.base), dscale(p.scale);
  DeviceTensor li(DType::bf16, {T, C}), hp(DType::f32, {T, n}), hpo(DType::f32, {T, n}), cb(DType::f32, {T, n, n}),
      xn(DType::bf16, {T, n, C});
  cudaStream_t stream;
  MHC_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto site = [&] {
    pre_forward({dx.view(), dfn.view(), dbase.view(), dscale.view(), li.view(), hp.view(), hpo.view(), cb.view(),
                 TensorView{}, TensorView{}},
                cfg, cuda_ctx(stream));
    post_forward({dx.view(), dy.view(), hpo.view(), cb.view(), xn.view()}, cfg, cuda_ctx(stream));
  };
  site();
  MHC_CHECK_CUDA(cudaStreamSynchronize(stream));
  const Tensor eager_li = li.download(), eager_xn = xn.download();
  li.poison();
  xn.poison();
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MHC_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  site();
  MHC_CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  MHC_CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  MHC_CHECK_CUDA(cudaGraphLaunch(exec, stream));
  MHC_CHECK_CUDA(cudaStreamSynchronize(stream));
  EXPECT_TRUE(bit_identical(li.download(), eager_li));
  EXPECT_TRUE(bit_identical(xn.download(), eager_xn));
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace mhc::gpu_test
