// Per-token ops whose cost is one pass over the streams: post (forward and backward), stream
// expand, residual_add_agg, and the non-finite scan behind NanPolicy::check.
//
// Shape of every kernel here: one block per token (grid-stride over tokens), the token's
// coefficients in registers, threads striding over the channels in 16-byte packs. Per-token
// reductions over C (grad_h_post, grad_comb, grad_h_pre) are summed in a fixed order, so repeated
// runs are bit-identical. The *_generic kernels take any n, any C and f64, one element at a time.
#include <algorithm>

#include "cuda/common.cuh"

namespace mhc::cuda_impl {

namespace {

using std::int64_t;

// Threads per block for one token of C channels in units of `unit` elements.
int token_threads(int64_t C, int unit) {
  const int64_t units = (C + unit - 1) / unit;
  return static_cast<int>(std::clamp<int64_t>((units + 31) / 32 * 32, 32, 256));
}

// Thread r < R of the block writes the block-wide sum of v[r] to out[r]. scratch: (warps * R).
template <int R, class M, class K>
__device__ __forceinline__ void block_sum_store(M (&v)[R], M* scratch, K* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = warp_sum(v[r]);
  __syncthreads();  // the previous token's readers are done with scratch
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) scratch[warp * R + r] = v[r];
  }
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    M total = 0;
    for (int w = 0; w < warps; ++w) total += scratch[w * R + r];
    out[r] = static_cast<K>(total);
  }
}

// Dot product over C by one warp, fixed order (lane-strided partial sums, then a butterfly).
template <class M, class A, class B>
__device__ __forceinline__ M warp_dot(A a, B b, int64_t C) {
  M acc = 0;
  for (int64_t c = threadIdx.x & 31; c < C; c += 32) acc += a(c) * b(c);
  return warp_sum(acc);
}

// ---- post -----------------------------------------------------------------------------------------
// x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i]
template <class S, int N>
__global__ void __launch_bounds__(256) post_forward_packed(const S* __restrict__ x, const S* __restrict__ y,
                                                           const float* __restrict__ h_post,
                                                           const float* __restrict__ comb, S* __restrict__ x_next,
                                                           int64_t T, int64_t C) {
  constexpr int P = kPack<S>;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    float hp[N], cb[N * N];
#pragma unroll
    for (int o = 0; o < N; ++o) hp[o] = __ldg(h_post + t * N + o);
#pragma unroll
    for (int r = 0; r < N * N; ++r) cb[r] = __ldg(comb + t * N * N + r);
    const S* xt = x + t * N * C;
    S* outt = x_next + t * N * C;
    for (int64_t c = threadIdx.x * P; c < C; c += blockDim.x * P) {
      Pack<S> xp[N];
#pragma unroll
      for (int i = 0; i < N; ++i) xp[i] = load_pack_stream(xt + i * C + c);
      const Pack<S> yp = load_pack_stream(y + t * C + c);
#pragma unroll
      for (int o = 0; o < N; ++o) {
        Pack<S> out;
#pragma unroll
        for (int e = 0; e < P; ++e) {
          float acc = hp[o] * to_math(yp.v[e]);
#pragma unroll
          for (int i = 0; i < N; ++i) acc += cb[i * N + o] * to_math(xp[i].v[e]);
          out.v[e] = from_math<S>(acc);
        }
        store_pack(outt + o * C + c, out);
      }
    }
  }
}

template <class S>
__global__ void post_forward_generic(const S* __restrict__ x, const S* __restrict__ y, const math_t<S>* h_post,
                                     const math_t<S>* comb, S* __restrict__ x_next, int64_t T, int n, int64_t C) {
  using M = math_t<S>;
  extern __shared__ unsigned char smem_raw[];
  M* coef = reinterpret_cast<M*>(smem_raw);  // h_post[n], comb[n*n]
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    __syncthreads();
    for (int r = threadIdx.x; r < n + n * n; r += blockDim.x)
      coef[r] = r < n ? h_post[t * n + r] : comb[t * n * n + r - n];
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < n * C; idx += blockDim.x) {
      const int o = static_cast<int>(idx / C);
      const int64_t c = idx % C;
      M acc = coef[o] * to_math(y[t * C + c]);
      for (int i = 0; i < n; ++i) acc += coef[n + i * n + o] * to_math(x[(t * n + i) * C + c]);
      x_next[t * n * C + idx] = from_math<S>(acc);
    }
  }
}

// grad_x[i] = sum_o comb[i, o] g[o];  grad_y = sum_o h_post[o] g[o];
// grad_h_post[o] = <g[o], y>;  grad_comb[i, o] = <g[o], x[i]>
template <class S, int N>
__global__ void __launch_bounds__(256) post_backward_packed(const S* __restrict__ g, const S* __restrict__ x,
                                                            const S* __restrict__ y, const float* __restrict__ h_post,
                                                            const float* __restrict__ comb, S* __restrict__ grad_x,
                                                            S* __restrict__ grad_y, float* __restrict__ grad_h_post,
                                                            float* __restrict__ grad_comb, int64_t T, int64_t C) {
  constexpr int P = kPack<S>;
  constexpr int R = N + N * N;  // grad_h_post[N], then grad_comb[N*N]
  __shared__ float scratch[(256 / 32) * R];
  __shared__ float totals[R];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    float hp[N], cb[N * N], acc[R];
#pragma unroll
    for (int o = 0; o < N; ++o) hp[o] = __ldg(h_post + t * N + o);
#pragma unroll
    for (int r = 0; r < N * N; ++r) cb[r] = __ldg(comb + t * N * N + r);
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    const int64_t base = t * N * C;
    for (int64_t c = threadIdx.x * P; c < C; c += blockDim.x * P) {
      Pack<S> gp[N], xp[N];
#pragma unroll
      for (int i = 0; i < N; ++i) {
        gp[i] = load_pack_stream(g + base + i * C + c);
        xp[i] = load_pack_stream(x + base + i * C + c);
      }
      const Pack<S> yp = load_pack_stream(y + t * C + c);
      Pack<S> gy;
#pragma unroll
      for (int e = 0; e < P; ++e) {
        float gv[N];
#pragma unroll
        for (int o = 0; o < N; ++o) gv[o] = to_math(gp[o].v[e]);
        const float yv = to_math(yp.v[e]);
        float sy = 0.f;
#pragma unroll
        for (int o = 0; o < N; ++o) {
          sy += hp[o] * gv[o];
          acc[o] += gv[o] * yv;
        }
        gy.v[e] = from_math<S>(sy);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float xv = to_math(xp[i].v[e]);
          float sx = 0.f;
#pragma unroll
          for (int o = 0; o < N; ++o) {
            sx += cb[i * N + o] * gv[o];
            acc[N + i * N + o] += gv[o] * xv;
          }
          xp[i].v[e] = from_math<S>(sx);  // reuse the register pack for grad_x
        }
      }
      store_pack(grad_y + t * C + c, gy);
#pragma unroll
      for (int i = 0; i < N; ++i) store_pack(grad_x + base + i * C + c, xp[i]);
    }
    // Totals go through shared memory, then to the two outputs.
    block_sum_store<R>(acc, scratch, totals);
    __syncthreads();
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
      if (r < N) grad_h_post[t * N + r] = totals[r];
      else grad_comb[t * N * N + (r - N)] = totals[r];
    }
  }
}

template <class S>
__global__ void post_backward_generic(const S* __restrict__ g, const S* __restrict__ x, const S* __restrict__ y,
                                      const math_t<S>* h_post, const math_t<S>* comb, S* __restrict__ grad_x,
                                      S* __restrict__ grad_y, math_t<S>* grad_h_post, math_t<S>* grad_comb,
                                      int64_t T, int n, int64_t C) {
  using M = math_t<S>;
  extern __shared__ unsigned char smem_raw[];
  M* coef = reinterpret_cast<M*>(smem_raw);  // h_post[n], comb[n*n]
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    __syncthreads();
    for (int r = threadIdx.x; r < n + n * n; r += blockDim.x)
      coef[r] = r < n ? h_post[t * n + r] : comb[t * n * n + r - n];
    __syncthreads();
    const S* gt = g + t * n * C;
    const S* xt = x + t * n * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      M sy = 0;
      for (int o = 0; o < n; ++o) sy += coef[o] * to_math(gt[o * C + c]);
      grad_y[t * C + c] = from_math<S>(sy);
      for (int i = 0; i < n; ++i) {
        M sx = 0;
        for (int o = 0; o < n; ++o) sx += coef[n + i * n + o] * to_math(gt[o * C + c]);
        grad_x[t * n * C + i * C + c] = from_math<S>(sx);
      }
    }
    // One warp per reduced value: pair r < n is grad_h_post[r], else grad_comb[i, o].
    for (int r = warp; r < n + n * n; r += warps) {
      M total;
      if (r < n) {
        total = warp_dot<M>([&](int64_t c) { return to_math(gt[r * C + c]); },
                            [&](int64_t c) { return to_math(y[t * C + c]); }, C);
        if ((threadIdx.x & 31) == 0) grad_h_post[t * n + r] = total;
      } else {
        const int i = (r - n) / n, o = (r - n) % n;
        total = warp_dot<M>([&](int64_t c) { return to_math(gt[o * C + c]); },
                            [&](int64_t c) { return to_math(xt[i * C + c]); }, C);
        if ((threadIdx.x & 31) == 0) grad_comb[t * n * n + r - n] = total;
      }
    }
  }
}

// ---- expand ---------------------------------------------------------------------------------------
template <class S>
__global__ void expand_forward_kernel(const S* __restrict__ x, S* __restrict__ out, int64_t T, int n, int64_t C,
                                      bool packed) {
  if (packed) {
    constexpr int P = kPack<S>;
    const int64_t packs = T * (C / P);
    for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < packs; q += int64_t(gridDim.x) * blockDim.x) {
      const int64_t t = q / (C / P), c = (q % (C / P)) * P;
      const Pack<S> v = load_pack_stream(x + t * C + c);
      for (int i = 0; i < n; ++i) store_pack(out + (t * n + i) * C + c, v);
    }
  } else {
    for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < T * C; q += int64_t(gridDim.x) * blockDim.x) {
      const int64_t t = q / C, c = q % C;
      const S v = x[q];
      for (int i = 0; i < n; ++i) out[(t * n + i) * C + c] = v;
    }
  }
}

template <class S>
__global__ void expand_backward_kernel(const S* __restrict__ g, S* __restrict__ grad_x, int64_t T, int n, int64_t C,
                                       bool packed) {
  using M = math_t<S>;
  if (packed) {
    constexpr int P = kPack<S>;
    const int64_t packs = T * (C / P);
    for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < packs; q += int64_t(gridDim.x) * blockDim.x) {
      const int64_t t = q / (C / P), c = (q % (C / P)) * P;
      M acc[P];
#pragma unroll
      for (int e = 0; e < P; ++e) acc[e] = 0;
      for (int i = 0; i < n; ++i) {
        const Pack<S> v = load_pack_stream(g + (t * n + i) * C + c);
#pragma unroll
        for (int e = 0; e < P; ++e) acc[e] += to_math(v.v[e]);
      }
      Pack<S> out;
#pragma unroll
      for (int e = 0; e < P; ++e) out.v[e] = from_math<S>(acc[e]);
      store_pack(grad_x + t * C + c, out);
    }
  } else {
    for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < T * C; q += int64_t(gridDim.x) * blockDim.x) {
      const int64_t t = q / C, c = q % C;
      M acc = 0;
      for (int i = 0; i < n; ++i) acc += to_math(g[(t * n + i) * C + c]);
      grad_x[q] = from_math<S>(acc);
    }
  }
}

// ---- residual_add_agg -----------------------------------------------------------------------------
// x_out = x + res (rounded to storage); agg = sum_i h_pre[i] * x_out[i] as stored.
template <class S, int N>
__global__ void __launch_bounds__(256) residual_forward_packed(const S* __restrict__ x, const S* __restrict__ res,
                                                               const float* __restrict__ h_pre, S* __restrict__ x_out,
                                                               S* __restrict__ agg, int64_t T, int64_t C) {
  constexpr int P = kPack<S>;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    float hp[N];
#pragma unroll
    for (int i = 0; i < N; ++i) hp[i] = __ldg(h_pre + t * N + i);
    for (int64_t c = threadIdx.x * P; c < C; c += blockDim.x * P) {
      float acc[P];
#pragma unroll
      for (int e = 0; e < P; ++e) acc[e] = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int64_t off = (t * N + i) * C + c;
        const Pack<S> a = load_pack_stream(x + off), b = load_pack_stream(res + off);
        Pack<S> s;
#pragma unroll
        for (int e = 0; e < P; ++e) {
          s.v[e] = from_math<S>(to_math(a.v[e]) + to_math(b.v[e]));
          acc[e] += hp[i] * to_math(s.v[e]);
        }
        store_pack(x_out + off, s);
      }
      Pack<S> out;
#pragma unroll
      for (int e = 0; e < P; ++e) out.v[e] = from_math<S>(acc[e]);
      store_pack(agg + t * C + c, out);
    }
  }
}

template <class S>
__global__ void residual_forward_generic(const S* __restrict__ x, const S* __restrict__ res, const math_t<S>* h_pre,
                                         S* __restrict__ x_out, S* __restrict__ agg, int64_t T, int n, int64_t C) {
  using M = math_t<S>;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < T * C; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = q / C, c = q % C;
    M acc = 0;
    for (int i = 0; i < n; ++i) {
      const int64_t off = (t * n + i) * C + c;
      const S s = from_math<S>(to_math(x[off]) + to_math(res[off]));
      x_out[off] = s;
      acc += h_pre[t * n + i] * to_math(s);
    }
    agg[q] = from_math<S>(acc);
  }
}

// grad_sum[i] = grad_x_out[i] + h_pre[i] * grad_agg;  grad_h_pre[i] = <grad_agg, x_out[i]>
template <class S, int N>
__global__ void __launch_bounds__(256) residual_backward_packed(const S* __restrict__ g_out, const S* __restrict__ g_agg,
                                                                const S* __restrict__ x_out,
                                                                const float* __restrict__ h_pre, S* __restrict__ grad_sum,
                                                                float* __restrict__ grad_h_pre, int64_t T, int64_t C) {
  constexpr int P = kPack<S>;
  __shared__ float scratch[(256 / 32) * N];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    float hp[N], acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      hp[i] = __ldg(h_pre + t * N + i);
      acc[i] = 0.f;
    }
    for (int64_t c = threadIdx.x * P; c < C; c += blockDim.x * P) {
      float ga[P];
      if (g_agg) {
        const Pack<S> v = load_pack_stream(g_agg + t * C + c);
#pragma unroll
        for (int e = 0; e < P; ++e) ga[e] = to_math(v.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < P; ++e) ga[e] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int64_t off = (t * N + i) * C + c;
        Pack<S> go;
        if (g_out) go = load_pack_stream(g_out + off);
        if (g_agg) {
          const Pack<S> xo = load_pack_stream(x_out + off);
#pragma unroll
          for (int e = 0; e < P; ++e) acc[i] += ga[e] * to_math(xo.v[e]);
        }
        Pack<S> s;
#pragma unroll
        for (int e = 0; e < P; ++e) s.v[e] = from_math<S>((g_out ? to_math(go.v[e]) : 0.f) + hp[i] * ga[e]);
        store_pack(grad_sum + off, s);
      }
    }
    block_sum_store<N>(acc, scratch, grad_h_pre + t * N);
  }
}

template <class S>
__global__ void residual_backward_generic(const S* __restrict__ g_out, const S* __restrict__ g_agg,
                                          const S* __restrict__ x_out, const math_t<S>* h_pre, S* __restrict__ grad_sum,
                                          math_t<S>* grad_h_pre, int64_t T, int n, int64_t C) {
  using M = math_t<S>;
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t idx = threadIdx.x; idx < n * C; idx += blockDim.x) {
      const int i = static_cast<int>(idx / C);
      const int64_t c = idx % C, off = t * n * C + idx;
      const M ga = g_agg ? to_math(g_agg[t * C + c]) : M(0);
      grad_sum[off] = from_math<S>((g_out ? to_math(g_out[off]) : M(0)) + h_pre[t * n + i] * ga);
    }
    for (int i = warp; i < n; i += warps) {
      M total = 0;
      if (g_agg)
        total = warp_dot<M>([&](int64_t c) { return to_math(g_agg[t * C + c]); },
                            [&](int64_t c) { return to_math(x_out[(t * n + i) * C + c]); }, C);
      if ((threadIdx.x & 31) == 0) grad_h_pre[t * n + i] = total;
    }
  }
}

// ---- non-finite scan ------------------------------------------------------------------------------
template <class S>
__global__ void count_nonfinite_kernel(const S* __restrict__ p, int64_t count, unsigned long long* bad) {
  unsigned long long local = 0;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < count; q += int64_t(gridDim.x) * blockDim.x) {
    const auto v = to_math(p[q]);
    if (!isfinite(v)) ++local;
  }
  local = __reduce_add_sync(0xffffffffu, static_cast<unsigned>(local));
  if ((threadIdx.x & 31) == 0 && local) atomicAdd(bad, local);  // integer: order does not matter
}


}  // namespace

// ---- entry points ---------------------------------------------------------------------------------

void post_forward(const PostForward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.x.shape[0], C = a.x.shape[2];
  const int n = static_cast<int>(a.x.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.x.device);
  const cudaStream_t stream = stream_of(ctx);
  dispatch_storage(a.x.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using M = math_t<S>;
    const bool fast = packable<S>(C) && aligned16({&a.x, &a.y, &a.x_next});
    dispatch_streams(n, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      if constexpr (N > 0 && !std::is_same_v<S, double>) {
        if (fast) {
          post_forward_packed<S, N><<<token_grid(T), token_threads(C, kPack<S>), 0, stream>>>(
              a.x.ptr<S>(), a.y.ptr<S>(), a.h_post.ptr<float>(), a.comb.ptr<float>(), a.x_next.ptr<S>(), T, C);
          MHC_CUDA_CHECK_LAUNCH();
          return;
        }
      }
      post_forward_generic<S><<<token_grid(T), 256, (n + n * n) * sizeof(M), stream>>>(
          a.x.ptr<S>(), a.y.ptr<S>(), a.h_post.ptr<M>(), a.comb.ptr<M>(), a.x_next.ptr<S>(), T, n, C);
      MHC_CUDA_CHECK_LAUNCH();
    });
  });
}

void post_backward(const PostBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.x.shape[0], C = a.x.shape[2];
  const int n = static_cast<int>(a.x.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.x.device);
  const cudaStream_t stream = stream_of(ctx);
  dispatch_storage(a.x.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using M = math_t<S>;
    const bool fast = packable<S>(C) && aligned16({&a.grad_x_next, &a.x, &a.y, &a.grad_x, &a.grad_y});
    dispatch_streams(n, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      if constexpr (N > 0 && !std::is_same_v<S, double>) {
        if (fast) {
          post_backward_packed<S, N><<<token_grid(T), token_threads(C, kPack<S>), 0, stream>>>(
              a.grad_x_next.ptr<S>(), a.x.ptr<S>(), a.y.ptr<S>(), a.h_post.ptr<float>(), a.comb.ptr<float>(),
              a.grad_x.ptr<S>(), a.grad_y.ptr<S>(), a.grad_h_post.ptr<float>(), a.grad_comb.ptr<float>(), T, C);
          MHC_CUDA_CHECK_LAUNCH();
          return;
        }
      }
      post_backward_generic<S><<<token_grid(T), 256, (n + n * n) * sizeof(M), stream>>>(
          a.grad_x_next.ptr<S>(), a.x.ptr<S>(), a.y.ptr<S>(), a.h_post.ptr<M>(), a.comb.ptr<M>(), a.grad_x.ptr<S>(),
          a.grad_y.ptr<S>(), a.grad_h_post.ptr<M>(), a.grad_comb.ptr<M>(), T, n, C);
      MHC_CUDA_CHECK_LAUNCH();
    });
  });
}

void expand_forward(const ExpandForward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.out.shape[0], C = a.out.shape[2];
  const int n = static_cast<int>(a.out.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.x.device);
  dispatch_storage(a.x.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    const bool packed = C % kPack<S> == 0 && aligned16({&a.x, &a.out});
    const int64_t items = packed ? T * C / kPack<S> : T * C;
    expand_forward_kernel<S><<<grid_for(items, 256), 256, 0, stream_of(ctx)>>>(a.x.ptr<S>(), a.out.ptr<S>(), T, n,
                                                                                  C, packed);
    MHC_CUDA_CHECK_LAUNCH();
  });
}

void expand_backward(const ExpandBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.grad_out.shape[0], C = a.grad_out.shape[2];
  const int n = static_cast<int>(a.grad_out.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.grad_out.device);
  dispatch_storage(a.grad_out.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    const bool packed = C % kPack<S> == 0 && aligned16({&a.grad_out, &a.grad_x});
    const int64_t items = packed ? T * C / kPack<S> : T * C;
    expand_backward_kernel<S><<<grid_for(items, 256), 256, 0, stream_of(ctx)>>>(a.grad_out.ptr<S>(),
                                                                                   a.grad_x.ptr<S>(), T, n, C, packed);
    MHC_CUDA_CHECK_LAUNCH();
  });
}

void residual_add_agg_forward(const ResidualAddAggForward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.x.shape[0], C = a.x.shape[2];
  const int n = static_cast<int>(a.x.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.x.device);
  const cudaStream_t stream = stream_of(ctx);
  dispatch_storage(a.x.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using M = math_t<S>;
    const bool fast = packable<S>(C) && aligned16({&a.x, &a.res, &a.x_out, &a.agg});
    dispatch_streams(n, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      if constexpr (N > 0 && !std::is_same_v<S, double>) {
        if (fast) {
          residual_forward_packed<S, N><<<token_grid(T), token_threads(C, kPack<S>), 0, stream>>>(
              a.x.ptr<S>(), a.res.ptr<S>(), a.h_pre.ptr<float>(), a.x_out.ptr<S>(), a.agg.ptr<S>(), T, C);
          MHC_CUDA_CHECK_LAUNCH();
          return;
        }
      }
      residual_forward_generic<S><<<grid_for(T * C, 256), 256, 0, stream>>>(
          a.x.ptr<S>(), a.res.ptr<S>(), a.h_pre.ptr<M>(), a.x_out.ptr<S>(), a.agg.ptr<S>(), T, n, C);
      MHC_CUDA_CHECK_LAUNCH();
    });
  });
}

void residual_add_agg_backward(const ResidualAddAggBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.x_out.shape[0], C = a.x_out.shape[2];
  const int n = static_cast<int>(a.x_out.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.x_out.device);
  const cudaStream_t stream = stream_of(ctx);
  dispatch_storage(a.x_out.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using M = math_t<S>;
    const bool fast = packable<S>(C) && aligned16({&a.grad_x_out, &a.grad_agg, &a.x_out, &a.grad_sum});
    dispatch_streams(n, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      if constexpr (N > 0 && !std::is_same_v<S, double>) {
        if (fast) {
          residual_backward_packed<S, N><<<token_grid(T), token_threads(C, kPack<S>), 0, stream>>>(
              data_or_null<const S>(a.grad_x_out), data_or_null<const S>(a.grad_agg), a.x_out.ptr<S>(),
              a.h_pre.ptr<float>(), a.grad_sum.ptr<S>(), a.grad_h_pre.ptr<float>(), T, C);
          MHC_CUDA_CHECK_LAUNCH();
          return;
        }
      }
      residual_backward_generic<S><<<token_grid(T), 256, 0, stream>>>(
          data_or_null<const S>(a.grad_x_out), data_or_null<const S>(a.grad_agg), a.x_out.ptr<S>(), a.h_pre.ptr<M>(),
          a.grad_sum.ptr<S>(), a.grad_h_pre.ptr<M>(), T, n, C);
      MHC_CUDA_CHECK_LAUNCH();
    });
  });
}

std::int64_t count_nonfinite(const TensorView& t, const Context& ctx) {
  const int64_t count = t.numel();
  if (count == 0) return 0;
  const DeviceGuard guard(t.device);
  const cudaStream_t stream = stream_of(ctx);
  unsigned long long* bad = nullptr;
  MHC_CUDA_CHECK(cudaMallocAsync(&bad, sizeof(*bad), stream));
  unsigned long long host = 0;
  try {
    MHC_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(*bad), stream));
    dispatch_storage(t.dtype, [&](auto tag) {
      using S = typename decltype(tag)::type;
      count_nonfinite_kernel<S><<<grid_for(count, 256), 256, 0, stream>>>(t.ptr<S>(), count, bad);
      MHC_CUDA_CHECK_LAUNCH();
    });
    MHC_CUDA_CHECK(cudaMemcpyAsync(&host, bad, sizeof(host), cudaMemcpyDeviceToHost, stream));
    MHC_CUDA_CHECK(cudaStreamSynchronize(stream));
  } catch (...) {
    cudaFreeAsync(bad, stream);
    throw;
  }
  MHC_CUDA_CHECK(cudaFreeAsync(bad, stream));
  return static_cast<std::int64_t>(host);
}

}  // namespace mhc::cuda_impl
