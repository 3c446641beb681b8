// A small mHC stack driven from C++ through the installed mhc package (find_package(mhc)).
//
// embedding [T, C] -> expand to n streams -> L sites, each  pre -> F -> post  (sites after the
// first fuse the previous post with their pre) -> head -> out [T, C];  loss = mean(out^2) / 2.
// F is a fixed RMSNorm of layer_input (no weight), the sub-layer mhc-mlx uses when none is given.
// Every step runs the forward and the backward on random data, takes an SGD step on the
// parameters of every site, and prints the loss, the time of each half and a checksum.
//
//   mhc_example [--steps N] [--tokens T] [--width C] [--streams n] [--sites L] [--threads k]
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "mhc/mhc.hpp"

namespace {

using std::int64_t;

struct Options {
  int steps = 5, streams = 4, sites = 4, threads = 0;
  int64_t tokens = 512, width = 256;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const long value = std::strtol(argv[i + 1], nullptr, 10);
    if (key == "--steps") o.steps = static_cast<int>(value);
    else if (key == "--tokens") o.tokens = value;
    else if (key == "--width") o.width = value;
    else if (key == "--streams") o.streams = static_cast<int>(value);
    else if (key == "--sites") o.sites = static_cast<int>(value);
    else if (key == "--threads") o.threads = static_cast<int>(value);
    else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      std::exit(2);
    }
  }
  return o;
}

// A float32 tensor owning its memory.
struct Buf {
  std::vector<float> v;
  mhc::TensorView view;
  Buf() = default;
  explicit Buf(std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    v.assign(static_cast<std::size_t>(n), 0.0f);
    view = mhc::TensorView::contiguous(v.data(), mhc::DType::f32, shape);
  }
  float* data() { return v.data(); }
};

constexpr float kLearningRate = 1.0f;

double logit(double p) { return std::log(p) - std::log1p(-p); }

// Parameters, saved values and gradients of one site.
struct Site {
  Buf fn, base, scale;              // parameters
  Buf layer_input, y, h_pre, h_post, comb, mixes, rstd, norm_rstd;  // forward values kept for backward
  Buf grad_fn, grad_base, grad_scale;

  Site(int64_t T, int n, int64_t C, std::mt19937& rng) {
    const int64_t m = int64_t(n) * n + 2 * n;
    fn = Buf({m, n * C});
    base = Buf({m});
    scale = Buf({3});
    // Start as a plain residual network (as mhc.MHC does): h_pre = 1/n, h_post = 1, comb near the
    // identity, a small random projection gated by alpha = 0.01.
    std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(float(n * C)));
    for (float& w : fn.v) w = normal(rng);
    for (int i = 0; i < n; ++i) {
      base.data()[i] = static_cast<float>(logit(std::min(1.0 / n, 0.99)));
      base.data()[n + i] = static_cast<float>(logit(0.5));  // sigmoid * post_mult(2) = 1
      if (n > 1) base.data()[2 * n + i * n + i] = static_cast<float>(std::log(0.95 * (n - 1) / 0.05));
    }
    for (float& s : scale.v) s = 0.01f;
    layer_input = Buf({T, C});
    y = Buf({T, C});
    h_pre = Buf({T, n});
    h_post = Buf({T, n});
    comb = Buf({T, n, n});
    mixes = Buf({T, m});
    rstd = Buf({T});
    norm_rstd = Buf({T});
    grad_fn = Buf({m, n * C});
    grad_base = Buf({m});
    grad_scale = Buf({3});
  }

  void sgd(float lr) {
    for (auto [p, g] : {std::pair{&fn, &grad_fn}, {&base, &grad_base}, {&scale, &grad_scale}})
      for (std::size_t i = 0; i < p->v.size(); ++i) p->v[i] -= lr * g->v[i];
  }
};

// F: y = u * rsqrt(mean(u^2) + eps) per token, and its backward.
void rmsnorm(const Buf& u, Buf& y, Buf& r, int64_t T, int64_t C) {
  for (int64_t t = 0; t < T; ++t) {
    const float* ut = u.v.data() + t * C;
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += double(ut[c]) * ut[c];
    const float rt = static_cast<float>(1.0 / std::sqrt(ss / C + 1e-6));
    r.v[t] = rt;
    for (int64_t c = 0; c < C; ++c) y.v[t * C + c] = ut[c] * rt;
  }
}
void rmsnorm_backward(const Buf& u, const Buf& r, const Buf& gy, Buf& gu, int64_t T, int64_t C) {
  for (int64_t t = 0; t < T; ++t) {
    const float* ut = u.v.data() + t * C;
    const float* gt = gy.v.data() + t * C;
    double dot = 0;
    for (int64_t c = 0; c < C; ++c) dot += double(gt[c]) * ut[c];
    const float rt = r.v[t], k = static_cast<float>(dot / C) * rt * rt * rt;
    for (int64_t c = 0; c < C; ++c) gu.v[t * C + c] = rt * gt[c] - k * ut[c];
  }
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const int64_t T = o.tokens, C = o.width;
  const int n = o.streams, L = o.sites;
  mhc::MhcConfig cfg;
  cfg.n = n;
  const mhc::Context ctx{.backend = mhc::Backend::cpu_fast, .num_threads = o.threads};
  std::printf("mhc %s: %d sites, n = %d, C = %lld, %lld tokens (CUDA in this build: %s)\n", mhc::version(), L, n,
              static_cast<long long>(C), static_cast<long long>(T), mhc::built_with_cuda() ? "yes" : "no");

  std::mt19937 rng(2024);
  std::vector<Site> sites;
  for (int l = 0; l < L; ++l) sites.emplace_back(T, n, C, rng);
  std::vector<Buf> streams;  // x_0 .. x_L, [T, n, C] each
  for (int l = 0; l <= L; ++l) streams.emplace_back(Buf({T, n, C}));
  Buf embedding({T, C}), out({T, C}), head_weights({T, n}), head_mixes({T, n}), head_rstd({T});
  Buf head_base({n});  // static head: w = sigmoid(base) + eps, the same for every token
  Buf grad_out({T, C}), grad_embedding({T, C}), grad_head_base({n}), grad_y({T, C}), grad_li({T, C});
  Buf grad_x({T, n, C}), grad_x_post({T, n, C}), grad_h_post({T, n}), grad_comb({T, n, n});
  std::normal_distribution<float> normal(0.0f, 1.0f);

  for (int step = 0; step < o.steps; ++step) {
    for (float& e : embedding.v) e = normal(rng);  // fresh random data every step

    // ---- forward ----
    const auto t_fwd = std::chrono::steady_clock::now();
    mhc::expand_forward({embedding.view, streams[0].view}, cfg, ctx);
    for (int l = 0; l < L; ++l) {
      Site& s = sites[l];
      if (l == 0) {
        mhc::pre_forward({streams[0].view, s.fn.view, s.base.view, s.scale.view, s.layer_input.view, s.h_pre.view,
                          s.h_post.view, s.comb.view, s.mixes.view, s.rstd.view},
                         cfg, ctx);
      } else {  // post of site l-1 fused with the pre of site l
        Site& p = sites[l - 1];
        mhc::post_pre_forward({streams[l - 1].view, p.y.view, p.h_post.view, p.comb.view, s.fn.view, s.base.view,
                               s.scale.view, streams[l].view, s.layer_input.view, s.h_pre.view, s.h_post.view,
                               s.comb.view, s.mixes.view, s.rstd.view},
                              cfg, ctx);
      }
      rmsnorm(s.layer_input, s.y, s.norm_rstd, T, C);
    }
    Site& last = sites[L - 1];
    mhc::post_forward({streams[L - 1].view, last.y.view, last.h_post.view, last.comb.view, streams[L].view}, cfg,
                      ctx);
    mhc::head_forward({streams[L].view, mhc::TensorView::absent(), head_base.view, mhc::TensorView::absent(),
                       out.view, head_weights.view, head_mixes.view, head_rstd.view},
                      cfg, ctx);
    double loss = 0;
    for (int64_t i = 0; i < T * C; ++i) {
      loss += 0.5 * double(out.v[i]) * out.v[i] / double(T * C);
      grad_out.v[i] = out.v[i] / static_cast<float>(T * C);
    }
    const double fwd_s = seconds_since(t_fwd);

    // ---- backward ----
    const auto t_bwd = std::chrono::steady_clock::now();
    mhc::HeadBackward hb{streams[L].view, mhc::TensorView::absent(), head_base.view, mhc::TensorView::absent(),
                         head_mixes.view, head_rstd.view, grad_out.view, mhc::TensorView::absent(), grad_x.view,
                         mhc::TensorView::absent(), grad_head_base.view, mhc::TensorView::absent(), {}};
    std::vector<unsigned char> head_ws(mhc::head_backward_workspace_bytes(hb, cfg, ctx));
    hb.workspace = mhc::TensorView::contiguous(head_ws.data(), mhc::DType::f32, {int64_t(head_ws.size() / 4)});
    mhc::head_backward(hb, cfg, ctx);
    for (int l = L - 1; l >= 0; --l) {  // grad_x holds the gradient of x_{l+1}
      Site& s = sites[l];
      mhc::post_backward({grad_x.view, streams[l].view, s.y.view, s.h_post.view, s.comb.view, grad_x_post.view,
                          grad_y.view, grad_h_post.view, grad_comb.view},
                         cfg, ctx);
      rmsnorm_backward(s.layer_input, s.norm_rstd, grad_y, grad_li, T, C);
      // The pre backward recomputes the coefficients from mixes; grad_x_post is the residual path.
      mhc::PreBackward pb{streams[l].view, s.fn.view, s.base.view, s.scale.view, s.mixes.view, s.rstd.view,
                          grad_li.view, mhc::TensorView::absent(), grad_h_post.view, grad_comb.view,
                          grad_x_post.view, grad_x.view, s.grad_fn.view, s.grad_base.view, s.grad_scale.view, {}};
      std::vector<unsigned char> ws(mhc::pre_backward_workspace_bytes(pb, cfg, ctx));
      pb.workspace = mhc::TensorView::contiguous(ws.data(), mhc::DType::f32, {int64_t(ws.size() / 4)});
      mhc::pre_backward(pb, cfg, ctx);
    }
    mhc::expand_backward({grad_x.view, grad_embedding.view}, cfg, ctx);
    const double bwd_s = seconds_since(t_bwd);

    double checksum = 0;
    for (const Site& s : sites)
      for (float g : s.grad_fn.v) checksum += std::abs(g);
    for (float g : grad_embedding.v) checksum += std::abs(g);
    for (Site& s : sites) s.sgd(kLearningRate);
    std::printf("step %d  loss %.6f  forward %7.2f ms  backward %7.2f ms  checksum %.6e\n", step, loss,
                fwd_s * 1e3, bwd_s * 1e3, checksum);
  }
  return 0;
}
