# Install rules and the CMake package: find_package(ssmx CONFIG REQUIRED [COMPONENTS cuda]).
include_guard(GLOBAL)
include(CMakePackageConfigHelpers)

set(SSMX_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/ssmx" CACHE STRING
    "Where the ssmx CMake package files are installed (relative to the prefix)")

install(TARGETS ssmx EXPORT ssmxTargets)
install(EXPORT ssmxTargets NAMESPACE ssmx:: DESTINATION "${SSMX_INSTALL_CMAKEDIR}")

# Each component (ssmx_add_component) is a separate export set, so that a consumer without
# its dependency (the CUDA toolkit, nlohmann_json, MPI) can still use the rest of an
# install that was configured with it. SSMX_PACKAGE_HAS_<NAME> feeds ssmxConfig.cmake.in.
foreach(_component IN ITEMS cuda:Cuda io:Io dist:Dist)
  string(REPLACE ":" ";" _parts "${_component}")
  list(GET _parts 0 _name)
  list(GET _parts 1 _export)
  string(TOUPPER "${_name}" _upper)
  set(SSMX_PACKAGE_HAS_${_upper} OFF)
  if(TARGET ssmx_${_name})
    set(SSMX_PACKAGE_HAS_${_upper} ON)
    install(TARGETS ssmx_${_name} EXPORT ssmx${_export}Targets)
    install(EXPORT ssmx${_export}Targets NAMESPACE ssmx:: DESTINATION "${SSMX_INSTALL_CMAKEDIR}")
  endif()
endforeach()

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/ssmx" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
        FILES_MATCHING PATTERN "*.hpp" PATTERN "*.cuh" PATTERN "*.h")

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/ssmxConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/ssmxConfig.cmake"
  INSTALL_DESTINATION "${SSMX_INSTALL_CMAKEDIR}")
# A header-only library does not depend on the architecture it was configured on.
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/ssmxConfigVersion.cmake"
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMajorVersion
  ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/ssmxConfig.cmake" "${PROJECT_BINARY_DIR}/ssmxConfigVersion.cmake"
        DESTINATION "${SSMX_INSTALL_CMAKEDIR}")
