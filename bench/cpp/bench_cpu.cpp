// CPU benchmark of one mHC site: pre + post around an identity F (y = layer_input), n = 4,
// C = 1024, 4096 tokens, forward and forward + backward, f32 and bf16, the fp64 reference against
// the fast path. For comparison it also measures the memory bandwidth of multi-threaded,
// vectorised streaming loops (memcpy and a STREAM triad) on the same machine.
//
// GB/s of a site counts the floor bytes of docs/MATH.md section 3 (each input read once, each output
// written once): forward 3nC + 2C elements per token, forward + backward 7nC + 4C, plus the
// parameters. Run: build/<dir>/bench/cpp/bench_cpu [--benchmark_filter=fast]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/float_types.hpp"
#include "mhc/mhc.hpp"

namespace {

using std::int64_t;

// An owning buffer with a contiguous view.
struct Buffer {
  std::vector<unsigned char> bytes;
  mhc::TensorView view;
  Buffer() = default;
  Buffer(mhc::DType dtype, std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    bytes.assign(static_cast<std::size_t>(n) * mhc::dtype_size(dtype), 0);
    view = mhc::TensorView::contiguous(bytes.data(), dtype, shape);
  }
  void random(std::mt19937& rng, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    const int64_t n = view.numel();
    for (int64_t i = 0; i < n; ++i) {
      const float v = d(rng);
      switch (view.dtype) {
        case mhc::DType::f32: view.ptr<float>()[i] = v; break;
        case mhc::DType::bf16: view.ptr<mhc::detail::bf16>()[i] = mhc::detail::to_bf16(v); break;
        case mhc::DType::f16: view.ptr<mhc::detail::f16>()[i] = mhc::detail::to_f16(v); break;
        case mhc::DType::f64: view.ptr<double>()[i] = v; break;
      }
    }
  }
};

// One site with every buffer its forward and backward need, allocated once.
struct Site {
  int64_t T, n, C, m;
  mhc::DType dtype;
  mhc::MhcConfig cfg;
  Buffer x, fn, base, scale, layer_input, h_pre, h_post, comb, mixes, rstd, x_next;
  Buffer g_x_next, g_x_post, g_y, g_h_post, g_comb, g_x, g_fn, g_base, g_scale, workspace;

  Site(int64_t tokens, int64_t streams, int64_t width, mhc::DType storage)
      : T(tokens), n(streams), C(width), m(streams * streams + 2 * streams), dtype(storage) {
    using mhc::DType;
    cfg.n = static_cast<int>(n);
    std::mt19937 rng(1234);
    const float amp = 2.0f / std::sqrt(static_cast<float>(n * C));
    x = Buffer(dtype, {T, n, C});
    x.random(rng, -1, 1);
    fn = Buffer(DType::f32, {m, n * C});
    fn.random(rng, -amp, amp);
    base = Buffer(DType::f32, {m});
    base.random(rng, -1, 1);
    scale = Buffer(DType::f32, {3});
    scale.random(rng, 0.5f, 1.5f);
    layer_input = Buffer(dtype, {T, C});
    h_pre = Buffer(DType::f32, {T, n});
    h_post = Buffer(DType::f32, {T, n});
    comb = Buffer(DType::f32, {T, n, n});
    mixes = Buffer(DType::f32, {T, m});
    rstd = Buffer(DType::f32, {T});
    x_next = Buffer(dtype, {T, n, C});
    g_x_next = Buffer(dtype, {T, n, C});
    g_x_next.random(rng, -1, 1);
    g_x_post = Buffer(dtype, {T, n, C});
    g_y = Buffer(dtype, {T, C});
    g_h_post = Buffer(DType::f32, {T, n});
    g_comb = Buffer(DType::f32, {T, n, n});
    g_x = Buffer(dtype, {T, n, C});
    g_fn = Buffer(DType::f32, {m, n * C});
    g_base = Buffer(DType::f32, {m});
    g_scale = Buffer(DType::f32, {3});
    workspace = Buffer(DType::f32, {int64_t(mhc::pre_backward_workspace_bytes(pre_backward_args(), cfg) / 4 + 1)});
  }

  mhc::PreBackward pre_backward_args() const {
    mhc::PreBackward a;
    a.x = x.view;
    a.fn = fn.view;
    a.base = base.view;
    a.scale = scale.view;
    a.mixes = mixes.view;
    a.rstd = rstd.view;
    a.grad_layer_input = g_y.view;  // F is the identity: grad of layer_input = grad of y
    a.grad_h_post = g_h_post.view;
    a.grad_comb = g_comb.view;
    a.grad_x_accum = g_x_post.view;  // the residual path through post
    a.grad_x = g_x.view;
    a.grad_fn = g_fn.view;
    a.grad_base = g_base.view;
    a.grad_scale = g_scale.view;
    a.workspace = workspace.view;
    return a;
  }

  void forward(const mhc::Context& ctx) {
    mhc::pre_forward({x.view, fn.view, base.view, scale.view, layer_input.view, h_pre.view, h_post.view, comb.view,
                      mixes.view, rstd.view},
                     cfg, ctx);
    mhc::post_forward({x.view, layer_input.view, h_post.view, comb.view, x_next.view}, cfg, ctx);
  }
  void backward(const mhc::Context& ctx) {
    mhc::post_backward({g_x_next.view, x.view, layer_input.view, h_post.view, comb.view, g_x_post.view, g_y.view,
                        g_h_post.view, g_comb.view},
                       cfg, ctx);
    mhc::pre_backward(pre_backward_args(), cfg, ctx);
  }

  // docs/MATH.md section 3: the bytes a fused site must move, parameters included.
  double floor_bytes(bool with_backward) const {
    const double elem = static_cast<double>(mhc::dtype_size(dtype));
    const double per_token = with_backward ? 7.0 * n * C + 4.0 * C : 3.0 * n * C + 2.0 * C;
    const double params = (with_backward ? 2.0 : 1.0) * static_cast<double>(m) * n * C * 4;
    return per_token * elem * T + params;
  }
};

constexpr int64_t kTokens = 4096, kStreams = 4, kWidth = 1024;

void BM_Site(benchmark::State& state, mhc::DType dtype, mhc::Backend backend, bool with_backward) {
  Site site(kTokens, kStreams, kWidth, dtype);
  const mhc::Context ctx{.backend = backend};
  site.forward(ctx);  // warm up, and the saved values of the first backward
  for (auto _ : state) {
    site.forward(ctx);
    if (with_backward) site.backward(ctx);
    benchmark::ClobberMemory();
  }
  state.counters["floor_GB"] =
      benchmark::Counter(site.floor_bytes(with_backward) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(double(kTokens), benchmark::Counter::kIsIterationInvariantRate);
}

// Each op of the site alone, fast path: where the time goes.
enum class Op { pre_forward, post_forward, post_backward, pre_backward };

void BM_Op(benchmark::State& state, mhc::DType dtype, Op op) {
  Site site(kTokens, kStreams, kWidth, dtype);
  const mhc::Context ctx{.backend = mhc::Backend::cpu_fast};
  site.forward(ctx);
  site.backward(ctx);
  const double elem = static_cast<double>(mhc::dtype_size(dtype)), nC = double(kStreams) * kWidth, C = kWidth;
  double bytes = 0;  // each tensor the op reads or writes, once
  for (auto _ : state) {
    switch (op) {
      case Op::pre_forward:
        mhc::pre_forward({site.x.view, site.fn.view, site.base.view, site.scale.view, site.layer_input.view,
                          site.h_pre.view, site.h_post.view, site.comb.view, site.mixes.view, site.rstd.view},
                         site.cfg, ctx);
        bytes = (nC + C) * elem;
        break;
      case Op::post_forward:
        mhc::post_forward({site.x.view, site.layer_input.view, site.h_post.view, site.comb.view, site.x_next.view},
                          site.cfg, ctx);
        bytes = (2 * nC + C) * elem;
        break;
      case Op::post_backward:
        mhc::post_backward({site.g_x_next.view, site.x.view, site.layer_input.view, site.h_post.view,
                            site.comb.view, site.g_x_post.view, site.g_y.view, site.g_h_post.view,
                            site.g_comb.view},
                           site.cfg, ctx);
        bytes = (3 * nC + 2 * C) * elem;
        break;
      case Op::pre_backward:
        mhc::pre_backward(site.pre_backward_args(), site.cfg, ctx);
        bytes = (3 * nC + C) * elem;
        break;
    }
    benchmark::ClobberMemory();
  }
  state.counters["GB"] = benchmark::Counter(bytes * kTokens / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- bandwidth of well-vectorised multi-threaded streaming loops ------------------------------------
constexpr std::size_t kStreamFloats = std::size_t(64) << 20;  // 256 MiB per array

template <class Body> void on_threads(int threads, std::size_t count, Body body) {
  std::vector<std::thread> pool;
  const std::size_t chunk = (count + threads - 1) / threads;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([=] { body(std::min(count, t * chunk), std::min(count, (t + 1) * chunk)); });
  for (auto& th : pool) th.join();
}

int hardware_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

// memcpy per thread: counts read + write.
void BM_Copy(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  std::vector<float> a(kStreamFloats, 1.0f), b(kStreamFloats, 2.0f);
  for (auto _ : state) {
    on_threads(threads, kStreamFloats, [&](std::size_t lo, std::size_t hi) {
      std::memcpy(b.data() + lo, a.data() + lo, (hi - lo) * sizeof(float));
    });
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] =
      benchmark::Counter(2.0 * kStreamFloats * sizeof(float) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// STREAM triad a = b + s * c: counts two reads and one write.
void BM_Triad(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  std::vector<float> a(kStreamFloats, 0.0f), b(kStreamFloats, 1.0f), c(kStreamFloats, 2.0f);
  for (auto _ : state) {
    on_threads(threads, kStreamFloats, [&](std::size_t lo, std::size_t hi) {
      float* __restrict pa = a.data();
      const float* __restrict pb = b.data();
      const float* __restrict pc = c.data();
      for (std::size_t i = lo; i < hi; ++i) pa[i] = pb[i] + 3.0f * pc[i];
    });
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] =
      benchmark::Counter(3.0 * kStreamFloats * sizeof(float) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  using mhc::Backend;
  using mhc::DType;
  benchmark::Initialize(&argc, argv);
  for (auto [dtype, dname] : {std::pair{DType::f32, "f32"}, {DType::bf16, "bf16"}})
    for (auto [backend, bname] : {std::pair{Backend::cpu_fast, "fast"}, {Backend::cpu_reference, "reference"}})
      for (auto [bwd, mode] : {std::pair{false, "fwd"}, {true, "fwd_bwd"}}) {
        const std::string name = std::string("site_") + mode + "/" + dname + "/" + bname + "/n4_C1024_T4096";
        auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_Site, dtype, backend, bwd);
        b->UseRealTime()->Unit(benchmark::kMillisecond);
        if (backend == Backend::cpu_reference) b->Iterations(1);
        else b->MinTime(1.0);
      }
  for (auto [dtype, dname] : {std::pair{DType::f32, "f32"}, {DType::bf16, "bf16"}})
    for (auto [op, oname] : {std::pair{Op::pre_forward, "pre_forward"}, {Op::post_forward, "post_forward"},
                             {Op::post_backward, "post_backward"}, {Op::pre_backward, "pre_backward"}}) {
      const std::string name = std::string("op_") + oname + "/" + dname + "/fast/n4_C1024_T4096";
      benchmark::RegisterBenchmark(name.c_str(), BM_Op, dtype, op)->UseRealTime()->Unit(benchmark::kMillisecond);
    }
  for (int threads : {1, hardware_threads()}) {
    benchmark::RegisterBenchmark("bandwidth/memcpy", BM_Copy)->Arg(threads)->UseRealTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("bandwidth/triad", BM_Triad)->Arg(threads)->UseRealTime()->Unit(benchmark::kMillisecond);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
