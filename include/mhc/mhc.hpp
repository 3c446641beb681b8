// Umbrella header of the mhc library.
#pragma once

#include "mhc/config.hpp"
#include "mhc/errors.hpp"
#include "mhc/history.hpp"
#include "mhc/ops.hpp"
#include "mhc/tensor.hpp"
