// The JSON tuning table of the CUDA backend: parsing, matching rules, and rejection of bad files.
// Needs no GPU: the table is plain host code.
#include <gtest/gtest.h>

#include <string>

#include "cuda/tuning.hpp"
#include "mhc/ops.hpp"

namespace mhc::cuda_impl {
namespace {

const char* kTable = R"({
  "format": "mhc-tuning", "version": 1, "device": "Test GPU",
  "entries": [
    {"op": "pre_forward", "n": 4, "dtype": "bfloat16", "C": 4096, "tokens": [4096, null],
     "params": {"cluster": 8, "tile": 64}},
    {"op": "pre_forward", "n": 4, "C": [1024, 8192], "params": {"cluster": 4}},
    {"op": "pre_backward", "params": {"chunks": 3}}
  ]
})";

TEST(CudaTuning, FirstMatchingEntrySetsEachParameter) {
  ASSERT_EQ(load_tuning_text(kTable, "Test GPU"), "");
  EXPECT_EQ(::mhc::tuning_status().entries, 3);
  const TuningKey exact{"pre_forward", 4, DType::bf16, 4096, 8192};
  EXPECT_EQ(tuned(exact, "cluster", 16), 8);
  EXPECT_EQ(tuned(exact, "tile", 0), 64);
  // Fewer tokens than the first entry covers: the broader second entry applies.
  const TuningKey few{"pre_forward", 4, DType::bf16, 4096, 100};
  EXPECT_EQ(tuned(few, "cluster", 16), 4);
  EXPECT_EQ(tuned(few, "tile", 0), 0);  // no entry sets it: the fallback
  EXPECT_EQ(tuned({"pre_forward", 8, DType::bf16, 4096, 8192}, "cluster", 16), 16);
  EXPECT_EQ(tuned({"pre_forward", 4, DType::f32, 512, 8192}, "cluster", 16), 16);
  EXPECT_EQ(tuned({"pre_backward", 2, DType::f16, 7, 1}, "chunks", 1), 3);
  EXPECT_EQ(tuned({"post_forward", 4, DType::bf16, 4096, 8192}, "cluster", 5), 5);
}

TEST(CudaTuning, EntriesOfAnotherDeviceAreIgnored) {
  ASSERT_EQ(load_tuning_text(kTable, "Other GPU"), "");
  EXPECT_EQ(::mhc::tuning_status().entries, 0);
  EXPECT_EQ(tuned({"pre_forward", 4, DType::bf16, 4096, 8192}, "cluster", 16), 16);
}

TEST(CudaTuning, MalformedTablesAreRejectedWithAReason) {
  EXPECT_NE(load_tuning_text("{", "x"), "");
  EXPECT_NE(load_tuning_text(R"({"format": "other", "version": 1, "entries": []})", "x"), "");
  EXPECT_NE(load_tuning_text(R"({"format": "mhc-tuning", "version": 2, "entries": []})", "x"), "");
  EXPECT_NE(load_tuning_text(R"({"format": "mhc-tuning", "version": 1, "entries": [{"op": "a"}]})", "x"), "");
  EXPECT_NE(load_tuning_text(R"({"format": "mhc-tuning", "version": 1, "entries": [{"op": "a", "params": {"t": "x"}}]})", "x"), "");
  EXPECT_EQ(load_tuning_text(R"({"format": "mhc-tuning", "version": 1, "entries": []})", "x"), "");
}

}  // namespace
}  // namespace mhc::cuda_impl
