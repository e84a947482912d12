# ssmx_target_arch(<target>): builds one of ssmx's own tests, benchmarks or examples for the
# instruction set SSMX_ARCH names (-march=<arch>; nvcc hands it to the host compiler).
# Consumers of ssmx::ssmx never get it: the interface targets carry no such flag.
include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

set(SSMX_ARCH_FLAG "")
if(NOT SSMX_ARCH STREQUAL "")
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    string(MAKE_C_IDENTIFIER "SSMX_CXX_ACCEPTS_MARCH_${SSMX_ARCH}" _ssmx_arch_check)
    check_cxx_compiler_flag("-march=${SSMX_ARCH}" ${_ssmx_arch_check})
    if(${_ssmx_arch_check})
      set(SSMX_ARCH_FLAG "-march=${SSMX_ARCH}")
      message(STATUS "ssmx: tests, benchmarks and examples are built with -march=${SSMX_ARCH} (SSMX_ARCH)")
    else()
      message(STATUS "ssmx: ${CMAKE_CXX_COMPILER_ID} does not accept -march=${SSMX_ARCH}; tests, benchmarks "
                     "and examples use the compiler's default target (set SSMX_ARCH to another value, or empty)")
    endif()
  else()
    message(STATUS "ssmx: SSMX_ARCH=${SSMX_ARCH} is ignored for ${CMAKE_CXX_COMPILER_ID} (GCC and Clang only)")
  endif()
endif()

function(ssmx_target_arch target)
  if(SSMX_ARCH_FLAG)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${SSMX_ARCH_FLAG}>
                                             $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=${SSMX_ARCH_FLAG}>)
  endif()
endfunction()
