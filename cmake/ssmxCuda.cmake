# ssmx_detect_cuda(<out_var>): sets <out_var> to ON when a CUDA compiler is usable.
# nvcc is often installed without being on PATH; the standard location is tried too.
include_guard(GLOBAL)
include(CheckLanguage)

function(ssmx_detect_cuda out_var)
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND EXISTS "/usr/local/cuda/bin/nvcc")
    find_program(_ssmx_nvcc_on_path nvcc)
    if(NOT _ssmx_nvcc_on_path)
      set(CMAKE_CUDA_COMPILER "/usr/local/cuda/bin/nvcc" CACHE FILEPATH "CUDA compiler")
    endif()
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(${out_var} ON PARENT_SCOPE)
  else()
    set(${out_var} OFF PARENT_SCOPE)
  endif()
endfunction()

# ssmx_add_program(<name> <what> <sources...>): an executable of ssmx's own (example,
# benchmark) linking ssmx::ssmx, and ssmx::cuda when a source is .cu. Without
# SSMX_ENABLE_CUDA a CUDA program is skipped with a status message; callers test
# `if(TARGET <name>)`.
function(ssmx_add_program name what)
  set(sources ${ARGN})
  set(uses_cuda OFF)
  foreach(src IN LISTS sources)
    if(src MATCHES "\\.cu$")
      set(uses_cuda ON)
    endif()
  endforeach()
  if(uses_cuda AND NOT SSMX_ENABLE_CUDA)
    message(STATUS "ssmx: ${what} ${name} skipped (needs SSMX_ENABLE_CUDA)")
    return()
  endif()
  add_executable(${name} ${sources})
  target_link_libraries(${name} PRIVATE ssmx::ssmx)
  if(uses_cuda)
    target_link_libraries(${name} PRIVATE ssmx::cuda)
    target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--extended-lambda --expt-relaxed-constexpr>)
  endif()
  ssmx_target_warnings(${name})
endfunction()
