# ssmx_target_ubsan(<target>): with SSMX_UBSAN_INPUT_PROGRAMS, UndefinedBehaviorSanitizer
# (halting at the first report) for the programs that drive the parsers of untrusted bytes
# with malformed input: the bad-input suite and the fuzz replays. CI's sanitizer build sets
# it and puts AddressSanitizer on everything through CMAKE_CXX_FLAGS; the unit suite and the
# example programs there run under ASan alone, since UBSan's checks on the template-heavy
# engine add about 70% to ASan's compile time at -O0 (test_fused.cpp: 223 s against 131 s)
# and triple it at -O1.
include_guard(GLOBAL)

option(SSMX_UBSAN_INPUT_PROGRAMS "UBSan for the programs that read untrusted input (CI's sanitizer build)" OFF)

function(ssmx_target_ubsan target)
  if(SSMX_UBSAN_INPUT_PROGRAMS AND TARGET ${target})
    set(flags -fsanitize=undefined -fno-sanitize-recover=undefined)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${flags}>)
    target_link_options(${target} PRIVATE ${flags})
  endif()
endfunction()
