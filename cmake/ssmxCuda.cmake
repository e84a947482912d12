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
