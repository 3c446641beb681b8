// The ops registered with PyTorch's dispatcher (torch_ops.cpp): what the nanobind module exposes of them.
#pragma once

namespace mhc::python {

// While on, every output the registered ops allocate is NaN-filled first (the tests' poisoned outputs).
void set_poison_outputs(bool on);

}  // namespace mhc::python
