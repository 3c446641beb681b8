// Typed errors. Every message names the offending argument and what was expected.
// The Python layer maps InvalidArgument -> ValueError, DTypeError -> TypeError, the rest -> RuntimeError.
#pragma once

#include <stdexcept>
#include <string>

namespace mhc {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Wrong rank, shape, strides, n or C mismatch, null pointer, out-of-range option.
struct InvalidArgument : Error {
  using Error::Error;
};
// Non-finite input found under NanPolicy::check.
struct NonFiniteError : InvalidArgument {
  using InvalidArgument::InvalidArgument;
};
// Unsupported or mismatched element type.
struct DTypeError : Error {
  using Error::Error;
};
// Tensors on different devices, or a device this build cannot run on.
struct DeviceError : Error {
  using Error::Error;
};
// A CUDA runtime call or kernel launch failed.
struct CudaError : Error {
  using Error::Error;
};

}  // namespace mhc
