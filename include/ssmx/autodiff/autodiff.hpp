// ssmx — reverse-mode autodiff over expressions, and gradient checking.
#pragma once

#include "../expr/expr.hpp"
#include "gradcheck.hpp"
#include "tape.hpp"
