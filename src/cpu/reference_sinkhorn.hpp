// The fp64 reference Sinkhorn (docs/MATH.md section 1.1), shared by the reference of both op families: the n-stream
// comb and the doubly stochastic history projection. Plain loops; every intermediate matrix is kept so the
// backward runs in reverse through each normalisation.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

namespace mhc::cpu_ref::sinkhorn {

using Matrix = std::vector<double>;  // n x n, row-major

// Every intermediate matrix of the forward, kept so the backward can run in reverse through
// each normalisation. steps[0] is softmax(logits) + eps; each later step divides the previous
// one by its column sums (+eps) or row sums (+eps), alternating, starting with columns.
struct SinkhornTrace {
  int n = 0;
  Matrix softmax;             // softmax(logits) without the +eps
  std::vector<Matrix> steps;  // steps.back() is the result
  std::vector<bool> by_column;  // normalisation that produced steps[s + 1]
};

inline SinkhornTrace sinkhorn_trace(const Matrix& logits, int n, int iters, double eps) {
  SinkhornTrace tr;
  tr.n = n;
  tr.softmax.assign(n * n, 0.0);
  Matrix p(n * n);
  for (int j = 0; j < n; ++j) {
    double row_max = logits[j * n];
    for (int k = 1; k < n; ++k) row_max = std::max(row_max, logits[j * n + k]);
    double sum = 0.0;
    for (int k = 0; k < n; ++k) sum += std::exp(logits[j * n + k] - row_max);
    for (int k = 0; k < n; ++k) {
      tr.softmax[j * n + k] = std::exp(logits[j * n + k] - row_max) / sum;
      p[j * n + k] = tr.softmax[j * n + k] + eps;
    }
  }
  tr.steps.push_back(p);
  auto normalise = [&](bool by_column) {
    Matrix next = tr.steps.back();
    for (int a = 0; a < n; ++a) {
      double sum = 0.0;
      for (int b = 0; b < n; ++b) sum += by_column ? next[b * n + a] : next[a * n + b];
      for (int b = 0; b < n; ++b) (by_column ? next[b * n + a] : next[a * n + b]) /= sum + eps;
    }
    tr.steps.push_back(next);
    tr.by_column.push_back(by_column);
  };
  normalise(true);
  for (int it = 1; it < iters; ++it) {
    normalise(false);
    normalise(true);
  }
  return tr;
}

// Reverse mode through every normalisation and the softmax: d(result) -> d(logits).
inline Matrix sinkhorn_trace_backward(const SinkhornTrace& tr, Matrix grad, double eps) {
  const int n = tr.n;
  for (int s = static_cast<int>(tr.by_column.size()) - 1; s >= 0; --s) {
    const Matrix& in = tr.steps[s];  // Y = X / (sum(X) + eps) along the group
    const bool by_column = tr.by_column[s];
    Matrix g_in(n * n);
    for (int a = 0; a < n; ++a) {
      double sum = 0.0, dot = 0.0;
      for (int b = 0; b < n; ++b) {
        const int idx = by_column ? b * n + a : a * n + b;
        sum += in[idx];
        dot += grad[idx] * in[idx];
      }
      const double d = sum + eps;
      for (int b = 0; b < n; ++b) {
        const int idx = by_column ? b * n + a : a * n + b;
        g_in[idx] = grad[idx] / d - dot / (d * d);
      }
    }
    grad = g_in;
  }
  Matrix g_logits(n * n);  // softmax rows: dL = S * (dS - <dS, S>)
  for (int j = 0; j < n; ++j) {
    double dot = 0.0;
    for (int k = 0; k < n; ++k) dot += grad[j * n + k] * tr.softmax[j * n + k];
    for (int k = 0; k < n; ++k) g_logits[j * n + k] = tr.softmax[j * n + k] * (grad[j * n + k] - dot);
  }
  return g_logits;
}

}  // namespace mhc::cpu_ref::sinkhorn
