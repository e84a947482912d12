// ssmx — file input and output: safetensors files, training checkpoints, Hugging Face
// checkpoint directories. Not part of <ssmx/ssmx.hpp>: it needs nlohmann_json (link the
// CMake target ssmx::io), which the rest of ssmx does not.
#pragma once

#include "checkpoint.hpp"
#include "hf.hpp"
#include "mamba.hpp"
#include "safetensors.hpp"
