# Dependencies, all from Debian packages (see .ci/run for the list).

find_package(OpenMP REQUIRED COMPONENTS CXX)

# Debian's xsimd 8.1 exports a target that links "xtl" without finding it;
# an empty imported target keeps "-lxtl" off the link line. bnorm links xsimd
# only at build time (it is header-only), so the installed package does not
# depend on it.
if(NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
find_package(xsimd 8.1 REQUIRED)
