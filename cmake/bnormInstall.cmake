# Installed CMake package (find_package(bnorm) -> bnorm::bnorm) and pkg-config file.
include(CMakePackageConfigHelpers)

set(BNORM_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/bnorm)

install(TARGETS bnorm EXPORT bnormTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
# bnorm_mpi.h only with the library behind it (mpi/CMakeLists.txt installs it).
install(DIRECTORY include/bnorm DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        FILES_MATCHING PATTERN "*.h" PATTERN "*.hpp" PATTERN "bnorm_mpi.h" EXCLUDE)
install(EXPORT bnormTargets NAMESPACE bnorm:: DESTINATION ${BNORM_CMAKE_DIR})

configure_package_config_file(cmake/bnormConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/bnormConfig.cmake INSTALL_DESTINATION ${BNORM_CMAKE_DIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/bnormConfigVersion.cmake
  COMPATIBILITY SameMajorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/bnormConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/bnormConfigVersion.cmake
        DESTINATION ${BNORM_CMAKE_DIR})

# Relocatable: the prefix is found from the .pc file's own directory.
file(RELATIVE_PATH BNORM_PC_TO_PREFIX ${CMAKE_INSTALL_FULL_LIBDIR}/pkgconfig ${CMAKE_INSTALL_PREFIX})
string(REGEX REPLACE "/$" "" BNORM_PC_TO_PREFIX "${BNORM_PC_TO_PREFIX}")
configure_file(cmake/bnorm.pc.in ${CMAKE_CURRENT_BINARY_DIR}/bnorm.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/bnorm.pc
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
