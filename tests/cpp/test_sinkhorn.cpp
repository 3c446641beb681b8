// Properties of the Sinkhorn projection (docs/MATH.md section 1) on both CPU backends: doubly stochastic
// after 20 iterations, equal to the paper's Eq. 9 when eps = 0, and invariant to a constant added
// to a row of logits (so the row-max shift of the softmax has no gradient of its own).
#include "test_util.hpp"

namespace mhc::test {
namespace {

struct SinkhornCase {
  bool fast;
  int n;
  DType dtype;
};

class SinkhornProperties : public ::testing::TestWithParam<SinkhornCase> {
 protected:
  std::mt19937_64 rng{0x51u + static_cast<unsigned>(GetParam().n)};
  const int n = GetParam().n;
  const DType k = GetParam().dtype;
  const Context ctx = GetParam().fast ? kFast : kRef;
  const MhcConfig cfg = config_for(GetParam().n);
};

TEST_P(SinkhornProperties, RowsAndColumnsSumToOne) {
  SinkhornProblem p(16, n, k, rng, 1.0);
  p.forward(cfg, ctx);
  double worst_row = 0, worst_col = 0;
  for (int64_t t = 0; t < 16; ++t)
    for (int a = 0; a < n; ++a) {
      double row = 0, col = 0;
      for (int b = 0; b < n; ++b) {
        row += p.comb.get((t * n + a) * n + b);
        col += p.comb.get((t * n + b) * n + a);
        ASSERT_GT(p.comb.get((t * n + a) * n + b), 0.0);
      }
      worst_row = std::max(worst_row, std::abs(row - 1));
      worst_col = std::max(worst_col, std::abs(col - 1));
    }
  EXPECT_LT(worst_row, 1e-5);
  EXPECT_LT(worst_col, 1e-5);
}

// Eq. 9 of the paper on H_res = comb^T: M = exp(logits), then alternately normalise, iters times.
// On comb (the transpose) that is rows then columns; no eps.
TEST_P(SinkhornProperties, EqualsPaperEquationNineWithoutEps) {
  MhcConfig c = cfg;
  c.eps = 0.0f;
  SinkhornProblem p(8, n, k, rng, 1.5);
  p.forward(c, ctx);
  Tensor want(DType::f64, {8, n, n});
  for (int64_t t = 0; t < 8; ++t) {
    std::vector<double> m(n * n);
    for (int e = 0; e < n * n; ++e) m[e] = std::exp(p.logits.get(t * n * n + e));
    for (int it = 0; it < c.iters; ++it) {
      for (int j = 0; j < n; ++j) {
        double sum = 0;
        for (int kk = 0; kk < n; ++kk) sum += m[j * n + kk];
        for (int kk = 0; kk < n; ++kk) m[j * n + kk] /= sum;
      }
      for (int kk = 0; kk < n; ++kk) {
        double sum = 0;
        for (int j = 0; j < n; ++j) sum += m[j * n + kk];
        for (int j = 0; j < n; ++j) m[j * n + kk] /= sum;
      }
    }
    for (int e = 0; e < n * n; ++e) want.set(t * n * n + e, m[e]);
  }
  Tensor got(DType::f64, {8, n, n});
  for (int64_t e = 0; e < got.numel(); ++e) got.set(e, p.comb.get(e));
  EXPECT_TRUE(close("comb", got, want, 1e-5));
}

TEST_P(SinkhornProperties, RowShiftChangesNothing) {
  SinkhornProblem p(4, n, k, rng);
  p.forward(cfg, ctx);
  const Tensor before = p.comb;
  for (int64_t t = 0; t < 4; ++t)
    for (int j = 0; j < n; ++j) {
      const double shift = 3.0 * (j + 1) - 5.0 * t;
      for (int kk = 0; kk < n; ++kk) p.logits.set((t * n + j) * n + kk, p.logits.get((t * n + j) * n + kk) + shift);
    }
  p.forward(cfg, ctx);
  EXPECT_TRUE(close("comb after a row shift", p.comb, before, k == DType::f64 ? 1e-12 : 1e-5));

  // The gradient of a function invariant to row shifts sums to zero over each row.
  p.backward(cfg, ctx);
  double scale = 0;
  for (int64_t e = 0; e < p.grad_logits.numel(); ++e) scale = std::max(scale, std::abs(p.grad_logits.get(e)));
  if (n == 1) {  // comb is the constant 1 / (1 + eps): no gradient at all
    EXPECT_EQ(scale, 0.0);
    return;
  }
  ASSERT_GT(scale, 0.0);
  for (int64_t t = 0; t < 4; ++t)
    for (int j = 0; j < n; ++j) {
      double row = 0;
      for (int kk = 0; kk < n; ++kk) row += p.grad_logits.get((t * n + j) * n + kk);
      EXPECT_LT(std::abs(row), (k == DType::f64 ? 1e-12 : 1e-5) * scale) << "token " << t << " row " << j;
    }
}

// The fast path runs a few tokens one matrix at a time and more in vector batches: a token's result must not
// depend on how many tokens share the call (forward and backward, bit for bit).
TEST_P(SinkhornProperties, TokenCountDoesNotChangeBits) {
  constexpr int64_t kMany = 19;  // one full batch of 16 plus a ragged one
  SinkhornProblem many(kMany, n, k, rng);
  many.forward(cfg, ctx);
  many.backward(cfg, ctx);
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t count : {1, 2, 3}) {
    SinkhornProblem few(count, n, k, rng);
    for (int64_t e = 0; e < count * nn; ++e) {
      few.logits.set(e, many.logits.get(e));
      few.g_comb.set(e, many.g_comb.get(e));
    }
    few.forward(cfg, ctx);
    few.backward(cfg, ctx);
    for (int64_t e = 0; e < count * nn; ++e) {
      ASSERT_EQ(few.comb.get(e), many.comb.get(e)) << count << " tokens, element " << e;
      ASSERT_EQ(few.grad_logits.get(e), many.grad_logits.get(e)) << count << " tokens, element " << e;
    }
  }
}

std::vector<SinkhornCase> sinkhorn_cases() {
  std::vector<SinkhornCase> cases;
  for (bool fast : {false, true})
    for (int n : {1, 2, 3, 4, 8, 16})
      for (DType k : {DType::f32, DType::f64}) cases.push_back({fast, n, k});
  cases.push_back({true, 64, DType::f32});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(All, SinkhornProperties, ::testing::ValuesIn(sinkhorn_cases()), [](const auto& info) {
  return std::string(info.param.fast ? "fast_" : "reference_") + dtype_name(info.param.dtype) + "_n" +
         std::to_string(info.param.n);
});

}  // namespace
}  // namespace mhc::test
