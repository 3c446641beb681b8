// Sinkhorn on [T, n, n] logits as a standalone op (forward and exact reverse mode).
// n in {2, 4, 8}: one thread per matrix, the matrix in registers; the backward keeps each step's
// divisor vector in shared memory. Any other n (or too many iterations for that), one warp per
// matrix with the matrix in shared memory.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/sinkhorn.cuh"

namespace mhc::cuda_impl {

namespace {

using std::int64_t;

template <int N, class M>
__global__ void sinkhorn_forward_thread(const M* __restrict__ logits, M* __restrict__ comb, int64_t T, M eps,
                                        int iters) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T; t += int64_t(gridDim.x) * blockDim.x) {
    M p[N * N];
#pragma unroll
    for (int r = 0; r < N * N; ++r) p[r] = logits[t * N * N + r];
    sinkhorn_forward_reg<N>(p, eps, iters);
#pragma unroll
    for (int r = 0; r < N * N; ++r) comb[t * N * N + r] = p[r];
  }
}

template <class M>
__global__ void sinkhorn_forward_warp_kernel(const M* __restrict__ logits, M* __restrict__ comb, int64_t T, int n,
                                             M eps, int iters) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  M* p = reinterpret_cast<M*>(smem_raw) + warp * n * n;
  for (int64_t t = int64_t(blockIdx.x) * warps + warp; t < T; t += int64_t(gridDim.x) * warps) {
    for (int r = lane; r < n * n; r += 32) p[r] = logits[t * n * n + r];
    __syncwarp();
    sinkhorn_forward_warp(p, n, eps, iters);
    for (int r = lane; r < n * n; r += 32) comb[t * n * n + r] = p[r];
    __syncwarp();
  }
}

// Divisors of thread x: shared[(s * N + a) * blockDim.x + x].
template <int N, class M>
__global__ void sinkhorn_backward_thread(const M* __restrict__ logits, const M* __restrict__ grad_comb,
                                         M* __restrict__ grad_logits, int64_t T, M eps, int iters) {
  extern __shared__ unsigned char smem_raw[];
  M* divisors = reinterpret_cast<M*>(smem_raw) + threadIdx.x;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T; t += int64_t(gridDim.x) * blockDim.x) {
    M g[N * N];
#pragma unroll
    for (int r = 0; r < N * N; ++r) g[r] = grad_comb[t * N * N + r];
    const M* l = logits + t * N * N;
    sinkhorn_backward_reg<N>([&](int r) { return l[r]; }, g, eps, iters, divisors, blockDim.x);
#pragma unroll
    for (int r = 0; r < N * N; ++r) grad_logits[t * N * N + r] = g[r];
  }
}

// Per warp in shared memory: p[n*n], g[n*n], divisors[steps * n].
template <class M>
__global__ void sinkhorn_backward_warp_kernel(const M* __restrict__ logits, const M* __restrict__ grad_comb,
                                              M* __restrict__ grad_logits, int64_t T, int n, M eps, int iters) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  const int per_warp = 2 * n * n + sinkhorn_steps(iters) * n;
  M* p = reinterpret_cast<M*>(smem_raw) + warp * per_warp;
  M* g = p + n * n;
  M* divisors = g + n * n;
  for (int64_t t = int64_t(blockIdx.x) * warps + warp; t < T; t += int64_t(gridDim.x) * warps) {
    for (int r = lane; r < n * n; r += 32) g[r] = grad_comb[t * n * n + r];
    __syncwarp();
    sinkhorn_backward_warp(logits + t * n * n, p, g, n, eps, iters, divisors);
    for (int r = lane; r < n * n; r += 32) grad_logits[t * n * n + r] = g[r];
    __syncwarp();
  }
}


}  // namespace

void sinkhorn_forward(const SinkhornForward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.logits.shape[0];
  const int n = static_cast<int>(a.logits.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.logits.device);
  const cudaStream_t stream = stream_of(ctx);
  auto run = [&](auto tag) {
    using M = typename decltype(tag)::type;
    const M* logits = a.logits.ptr<const M>();
    M* comb = a.comb.ptr<M>();
    bool done = false;
    dispatch_streams(n, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      if constexpr (N > 0) {
        sinkhorn_forward_thread<N, M><<<blocks_for(T, 128), 128, 0, stream>>>(logits, comb, T, M(cfg.eps), cfg.iters);
        MHC_CUDA_CHECK_LAUNCH();
        done = true;
      }
    });
    if (!done) {
      const std::size_t per_warp = std::size_t(n) * n * sizeof(M);
      const int warps = static_cast<int>(std::clamp<std::size_t>(32768 / per_warp, 1, 8));
      sinkhorn_forward_warp_kernel<M><<<blocks_for(T, warps), warps * 32, warps * per_warp, stream>>>(
          logits, comb, T, n, M(cfg.eps), cfg.iters);
      MHC_CUDA_CHECK_LAUNCH();
    }
  };
  if (a.logits.dtype == DType::f64) run(TypeTag<double>{});
  else run(TypeTag<float>{});
}

void sinkhorn_backward(const SinkhornBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.logits.shape[0];
  const int n = static_cast<int>(a.logits.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.logits.device);
  const cudaStream_t stream = stream_of(ctx);
  const std::size_t smem_max = static_cast<std::size_t>(current_device_info().max_smem_optin);
  const std::size_t steps = static_cast<std::size_t>(sinkhorn_steps(cfg.iters));
  auto run = [&](auto tag) {
    using M = typename decltype(tag)::type;
    const M* logits = a.logits.ptr<const M>();
    const M* grad = a.grad_comb.ptr<const M>();
    M* out = a.grad_logits.ptr<M>();
    bool done = false;
    dispatch_streams(n, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      if constexpr (N > 0) {
        const std::size_t per_thread = steps * N * sizeof(M);
        const int threads = static_cast<int>(std::min<std::size_t>(128, smem_max / per_thread / 32 * 32));
        if (threads >= 32) {
          const std::size_t smem = per_thread * threads;
          allow_dynamic_smem(sinkhorn_backward_thread<N, M>, smem);
          sinkhorn_backward_thread<N, M><<<blocks_for(T, threads), threads, smem, stream>>>(logits, grad, out, T,
                                                                                             M(cfg.eps), cfg.iters);
          MHC_CUDA_CHECK_LAUNCH();
          done = true;
        }
      }
    });
    if (done) return;
    const std::size_t per_warp = (2 * std::size_t(n) * n + steps * n) * sizeof(M);
    if (per_warp > smem_max)
      throw InvalidArgument("mhc.sinkhorn_backward: iters = " + std::to_string(cfg.iters) + " with n = " +
                            std::to_string(n) + " needs " + std::to_string(per_warp) +
                            " bytes of shared memory per matrix on CUDA, more than the device's " +
                            std::to_string(smem_max));
    const int warps = static_cast<int>(std::clamp<std::size_t>(smem_max / 2 / per_warp, 1, 8));
    allow_dynamic_smem(sinkhorn_backward_warp_kernel<M>, warps * per_warp);
    sinkhorn_backward_warp_kernel<M><<<blocks_for(T, warps), warps * 32, warps * per_warp, stream>>>(
        logits, grad, out, T, n, M(cfg.eps), cfg.iters);
    MHC_CUDA_CHECK_LAUNCH();
  };
  if (a.logits.dtype == DType::f64) run(TypeTag<double>{});
  else run(TypeTag<float>{});
}

}  // namespace mhc::cuda_impl
