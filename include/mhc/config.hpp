// Hyper-parameters of an mHC site and how ops execute.
#pragma once

namespace mhc {

enum class NanPolicy {
  propagate,  // default: non-finite inputs flow through like any float arithmetic
  check,      // a forward scans its floating inputs first, a backward its incoming gradients (the saved forward
              // inputs were scanned by the forward); a non-finite value throws NonFiniteError naming the argument
              // (on CUDA this synchronises the stream: a debugging aid)
};

// docs/MATH.md section 1. Defaults are the paper's.
struct MhcConfig {
  int n = 4;               // residual streams, 1..64
  int iters = 20;          // Sinkhorn iterations, >= 1
  float eps = 1e-6f;       // Sinkhorn epsilon
  float norm_eps = 1e-6f;  // RMS-norm epsilon of the projection
  float pre_eps = 1e-6f;   // added to sigmoid for h_pre (and for the head's weights)
  float post_mult = 2.0f;  // h_post = sigmoid(.) * post_mult
  NanPolicy nan_policy = NanPolicy::propagate;
};

inline constexpr int kMaxStreams = 64;

enum class Backend {
  automatic,      // CPU tensors: cpu_fast; CUDA tensors: cuda
  cpu_reference,  // plain loops, fp64 accumulation: the oracle every fast path is tested against
  cpu_fast,       // multi-threaded, vectorisable, fp32 math (fp64 for f64 tensors)
  cuda,
};

struct Context {
  Backend backend = Backend::automatic;
  void* stream = nullptr;  // cudaStream_t for CUDA tensors; nullptr = default stream
  int num_threads = 0;     // CPU fast path: 0 = all available
};

}  // namespace mhc
