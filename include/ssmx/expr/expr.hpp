// ssmx — expression templates: nodes, evaluators and the host executor.
#pragma once

#include "../backend/cpu/exec.hpp"
#include "evaluator.hpp"
#include "functors.hpp"
#include "lifted.hpp"
#include "nodes.hpp"
