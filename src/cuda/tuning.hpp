// Tuning table of the CUDA backend: launch parameters per (op, n, dtype, C, tokens), read from a
// JSON file when one exists. The format is documented in docs/TUNING.md; python/mhc/tuning.py
// writes and validates it. Without a file (or without a matching entry) every kernel uses its
// built-in heuristic.
//
// File: $MHC_TUNING_FILE, else $XDG_CACHE_HOME/mhc/tuning.json, else $HOME/.cache/mhc/tuning.json.
// It is read once, at the first lookup (again on reload_tuning); a malformed file is reported once on
// stderr and ignored. The public status / reload / set functions are mhc::tuning_* (mhc/ops.hpp).
#pragma once

#include <cstdint>
#include <string>

#include "mhc/tensor.hpp"

namespace mhc::cuda_impl {

struct TuningKey {
  const char* op;  // "pre_forward", "post_pre_forward", "pre_backward", ...
  int n;
  DType dtype;
  std::int64_t C;
  std::int64_t tokens;
};

// Value of `param` in the first entry that matches `key` and sets it, or `fallback`.
int tuned(const TuningKey& key, const char* param, int fallback);

// Parses JSON text into the table (replacing it); returns an error message, empty on success.
// `device_name` stands for the current GPU's name.
std::string load_tuning_text(const std::string& text, const std::string& device_name);

}  // namespace mhc::cuda_impl
