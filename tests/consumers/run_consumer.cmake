# Configures, builds and runs one packaging consumer (cmake -P script, run by ctest).
#   -DMODE=add_subdirectory|find_package  -DSSMX_SOURCE_DIR=  -DSSMX_BINARY_DIR=
#   -DWORK_DIR=  -DGENERATOR=  -DCXX_COMPILER=  [-DBUILD_TYPE=]
# find_package mode first installs the ssmx build tree SSMX_BINARY_DIR into WORK_DIR/prefix.
cmake_minimum_required(VERSION 3.18)

foreach(_v MODE SSMX_SOURCE_DIR SSMX_BINARY_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${_v} OR "${${_v}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${_v}=... is required")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

# Runs a command; stops the script (and fails the test) when it fails.
function(run_step what)
  message(STATUS "consumer ${MODE}: ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc COMMAND_ECHO STDOUT)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "consumer ${MODE}: ${what} failed (${_rc})")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(_build "${WORK_DIR}/build")
set(_args -G "${GENERATOR}" -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=${BUILD_TYPE}
          -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)

if(MODE STREQUAL "add_subdirectory")
  list(APPEND _args -DSSMX_SOURCE_DIR=${SSMX_SOURCE_DIR})
elseif(MODE STREQUAL "find_package")
  set(_prefix "${WORK_DIR}/prefix")
  run_step("install" "${CMAKE_COMMAND}" --install "${SSMX_BINARY_DIR}" --prefix "${_prefix}" --config ${BUILD_TYPE})
  list(APPEND _args -DCMAKE_PREFIX_PATH=${_prefix})
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown MODE '${MODE}'")
endif()

run_step("configure" "${CMAKE_COMMAND}" -S "${SSMX_SOURCE_DIR}/tests/consumers/${MODE}" -B "${_build}" ${_args})
run_step("build" "${CMAKE_COMMAND}" --build "${_build}" --config ${BUILD_TYPE})
set(_exe "${_build}/consumer")
if(EXISTS "${_build}/${BUILD_TYPE}/consumer")  # multi-config generators
  set(_exe "${_build}/${BUILD_TYPE}/consumer")
endif()
run_step("run" "${_exe}")
