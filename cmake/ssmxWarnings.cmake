# ssmx_target_warnings(<target>): the warning level of ssmx's own tests, benchmarks and
# examples. Consumers of ssmx::ssmx get no flags from us. Eigen and other dependencies come
# in through imported targets, i.e. as SYSTEM includes, so their warnings stay out.
include_guard(GLOBAL)

set(SSMX_CXX_WARNINGS -Wall -Wextra -Wpedantic -Wshadow -Wconversion)

function(ssmx_target_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    set(cxx_flags ${SSMX_CXX_WARNINGS})
    if(SSMX_WARNINGS_AS_ERRORS)
      list(APPEND cxx_flags -Werror)
    endif()
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${cxx_flags}>)
  elseif(MSVC)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:/W4 $<$<BOOL:${SSMX_WARNINGS_AS_ERRORS}>:/WX>>)
  endif()
  if(CMAKE_CUDA_COMPILER)
    # nvcc: its own front-end warnings plus a lighter host-compiler set (the full set trips
    # on nvcc's generated stubs, which we cannot change).
    set(cuda_flags -Xcompiler=-Wall,-Wextra -Xcudafe=--display_error_number)
    if(SSMX_WARNINGS_AS_ERRORS)
      list(APPEND cuda_flags -Werror=all-warnings)
    endif()
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${cuda_flags}>)
  endif()
endfunction()
