# Install rules and the CMake package: find_package(ssmx CONFIG REQUIRED [COMPONENTS cuda]).
include_guard(GLOBAL)
include(CMakePackageConfigHelpers)

set(SSMX_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/ssmx" CACHE STRING
    "Where the ssmx CMake package files are installed (relative to the prefix)")

install(TARGETS ssmx EXPORT ssmxTargets)
install(EXPORT ssmxTargets NAMESPACE ssmx:: DESTINATION "${SSMX_INSTALL_CMAKEDIR}")

# The CUDA target is a separate export set so that a consumer without the CUDA toolkit can
# still use the host part of an install that was configured with CUDA.
set(SSMX_PACKAGE_HAS_CUDA OFF)
if(TARGET ssmx_cuda)
  set(SSMX_PACKAGE_HAS_CUDA ON)
  install(TARGETS ssmx_cuda EXPORT ssmxCudaTargets)
  install(EXPORT ssmxCudaTargets NAMESPACE ssmx:: DESTINATION "${SSMX_INSTALL_CMAKEDIR}")
endif()

# Likewise ssmx::io, which needs nlohmann_json.
set(SSMX_PACKAGE_HAS_IO OFF)
if(TARGET ssmx_io)
  set(SSMX_PACKAGE_HAS_IO ON)
  install(TARGETS ssmx_io EXPORT ssmxIoTargets)
  install(EXPORT ssmxIoTargets NAMESPACE ssmx:: DESTINATION "${SSMX_INSTALL_CMAKEDIR}")
endif()

# Likewise ssmx::dist, which needs MPI.
set(SSMX_PACKAGE_HAS_DIST OFF)
if(TARGET ssmx_dist)
  set(SSMX_PACKAGE_HAS_DIST ON)
  install(TARGETS ssmx_dist EXPORT ssmxDistTargets)
  install(EXPORT ssmxDistTargets NAMESPACE ssmx:: DESTINATION "${SSMX_INSTALL_CMAKEDIR}")
endif()

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
