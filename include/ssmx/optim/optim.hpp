// ssmx — optimisers (SGD, AdamW), gradient norms and clipping, learning-rate schedules.
//
// Every optimiser's step(params) validates the whole parameter list first (gradient
// shapes, finite gradient values, state shapes) and throws ssmx::Error naming the
// parameter before it changes anything: parameters and optimiser state are left
// bit-identical on an exception. State tensors are allocated with Tag::OptimizerState.
#pragma once

#include "adamw.hpp"
#include "clip.hpp"
#include "schedule.hpp"
#include "sgd.hpp"
