// ssmx — learning-rate schedules: lr(step) for step = 0, 1, 2, ... (the number of
// optimiser steps taken before the one that uses the rate). Use with set_lr:
//
//     opt.set_lr(schedule.lr(step));
//     opt.step(params);
#pragma once

#include <cmath>
#include <cstdint>

#include "../core/error.hpp"

namespace ssmx {

// The same rate at every step.
struct ConstantLR {
  double value;

  explicit ConstantLR(double lr) : value(lr) {
    SSMX_REQUIRE(lr >= 0.0 && std::isfinite(lr), ValueError, "ConstantLR: learning rate must be finite and >= 0, got ",
                 lr);
  }
  double lr(std::int64_t step) const {
    SSMX_REQUIRE(step >= 0, ValueError, "ConstantLR: step must be >= 0, got ", step);
    return value;
  }
};

// Linear warmup from 0 to peak_lr over warmup_steps, then a half cosine from peak_lr down
// to min_lr at total_steps, and min_lr after that (the shape of Hugging Face's
// get_cosine_schedule_with_warmup, with a floor):
//
//     step <  warmup:          peak * step / warmup
//     warmup <= step < total:  min + (peak - min) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
//     step >= total:           min
struct WarmupCosine {
  std::int64_t warmup_steps;
  std::int64_t total_steps;
  double peak_lr;
  double min_lr;

  WarmupCosine(std::int64_t warmup, std::int64_t total, double peak, double min = 0.0)
      : warmup_steps(warmup), total_steps(total), peak_lr(peak), min_lr(min) {
    SSMX_REQUIRE(warmup >= 0 && warmup <= total, ValueError, "WarmupCosine: need 0 <= warmup_steps <= total_steps, got ",
                 warmup, " and ", total);
    SSMX_REQUIRE(std::isfinite(peak) && std::isfinite(min) && 0.0 <= min && min <= peak, ValueError,
                 "WarmupCosine: need 0 <= min_lr <= peak_lr (finite), got min_lr ", min, " and peak_lr ", peak);
  }

  double lr(std::int64_t step) const {
    SSMX_REQUIRE(step >= 0, ValueError, "WarmupCosine: step must be >= 0, got ", step);
    if (step < warmup_steps) return peak_lr * double(step) / double(warmup_steps);
    if (step >= total_steps) return min_lr;
    const double pi = 3.14159265358979323846;
    const double progress = double(step - warmup_steps) / double(total_steps - warmup_steps);
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + std::cos(pi * progress));
  }
};

}  // namespace ssmx
