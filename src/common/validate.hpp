// Argument checks shared by every op's front end. Messages read
// "mhc.<op>: <arg>: expected <what>, got <what>".
#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>

#include "mhc/config.hpp"
#include "mhc/errors.hpp"
#include "mhc/tensor.hpp"

namespace mhc::detail {

// The dtype of coefficients and parameters that goes with a stream dtype.
inline DType coef_dtype(DType storage) { return storage == DType::f64 ? DType::f64 : DType::f32; }

// Symbolic dimension for messages: value plus its name ("T", "n", "C", "m", "n*C").
struct Dim {
  std::int64_t value;
  const char* name;
};

class ArgChecker {
 public:
  explicit ArgChecker(const char* op) : op_(op) {}

  [[noreturn]] void fail(const std::string& message) const;
  [[noreturn]] void fail_dtype(const std::string& message) const;
  [[noreturn]] void fail_device(const std::string& message) const;

  // A present, contiguous tensor of exactly this shape, dtype and device.
  void tensor(const TensorView& t, const char* name, std::initializer_list<Dim> shape, DType dtype,
              Device device) const;
  // Same, but an absent view is accepted.
  void optional(const TensorView& t, const char* name, std::initializer_list<Dim> shape,
                DType dtype, Device device) const;
  // The stream tensor that fixes the op's device and storage dtype: present, contiguous, `rank`-D,
  // a supported dtype, data present when non-empty.
  void leading(const TensorView& t, const char* name, int rank, const char* layout) const;
  void present(const TensorView& t, const char* name) const;
  // A backward's scratch buffer "workspace": at least `needed` bytes on `device` (anything when 0).
  void workspace(const TensorView& ws, std::size_t needed, Device device) const;
  void streams(std::int64_t n, const MhcConfig& cfg, const char* name) const;
  void config(const MhcConfig& cfg) const;
  // No output shares memory with an input or another output (the kernels read inputs at other elements than they
  // write); absent and empty views are skipped. Call after the tensors' own checks (they are then contiguous).
  struct Named {
    const TensorView& t;
    const char* name;
    int index = -1;  // >= 0: the entry name[index] of a list argument (the states)
    std::string label() const { return index < 0 ? name : std::string(name) + "[" + std::to_string(index) + "]"; }
  };
  void disjoint(std::span<const Named> outputs, std::span<const Named> inputs) const;
  void disjoint(std::initializer_list<Named> outputs, std::initializer_list<Named> inputs) const {
    disjoint(std::span<const Named>(outputs.begin(), outputs.size()),
             std::span<const Named>(inputs.begin(), inputs.size()));
  }

 private:
  const char* op_;
};

// Which backend runs an op on tensors of `device`; throws DeviceError where none can.
Backend select_backend(Device device, const Context& ctx);

// Throws NonFiniteError naming `name` when cfg.nan_policy == check and t holds NaN or Inf.
void check_finite(const TensorView& t, const char* name, const char* op, const MhcConfig& cfg,
                  const Context& ctx);

}  // namespace mhc::detail
