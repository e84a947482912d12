// ssmx — file input and output: safetensors files, training checkpoints, Hugging Face
// checkpoint directories, strict JSON. Not part of <ssmx/ssmx.hpp>: it needs nlohmann_json
// (link the CMake target ssmx::io), which the rest of ssmx does not (file.hpp, the POSIX
// file helpers, needs nothing and is also used by data/token_file.hpp).
#pragma once

#include "checkpoint.hpp"
#include "file.hpp"
#include "hf.hpp"
#include "json.hpp"
#include "mamba.hpp"
#include "mamba2.hpp"
#include "safetensors.hpp"
