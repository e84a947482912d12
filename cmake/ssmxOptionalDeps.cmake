# Optional dependencies. Each is found quietly; none is required and none is linked into
# ssmx::ssmx. A feature that needs one should:
#   1. link it into the target that needs it (ssmx, or a new ssmx_<feature> target), and
#   2. add a find_dependency() line to cmake/ssmxConfig.cmake.in under the same condition.
#
#   nlohmann_json  (Debian: nlohmann-json3-dev)  -> nlohmann_json::nlohmann_json  (ssmx::io: safetensors, checkpoints)
#   CLI11          (Debian: libcli11-dev)        -> CLI11::CLI11                  (examples' command lines)
#   MPI            (Debian: libopenmpi-dev)      -> MPI::MPI_CXX                  (dist/)
include_guard(GLOBAL)

option(SSMX_ENABLE_MPI "Look for MPI (Open MPI) for the distributed features" ON)

find_package(nlohmann_json 3 QUIET)
find_package(CLI11 QUIET)
if(SSMX_ENABLE_MPI)
  find_package(MPI QUIET COMPONENTS CXX)
endif()

set(SSMX_HAS_JSON ${nlohmann_json_FOUND})
set(SSMX_HAS_CLI11 ${CLI11_FOUND})
set(SSMX_HAS_MPI ${MPI_CXX_FOUND})
message(STATUS "ssmx optional deps: nlohmann_json=${SSMX_HAS_JSON} CLI11=${SSMX_HAS_CLI11} MPI=${SSMX_HAS_MPI}")
