# Installs the built bnorm into a scratch prefix, then builds the examples as
# a separate project with find_package(bnorm), and the C example with plain
# cc + pkg-config, and runs both.
file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}")
  endif()
  message(STATUS "ok: ${ARGN}")
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/build -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${WORK_DIR}/build/bnorm_example_c)
run(${WORK_DIR}/build/bnorm_example_cpp)

# pkg-config
file(GLOB pcdir ${prefix}/lib*/pkgconfig ${prefix}/lib/*/pkgconfig)
set(ENV{PKG_CONFIG_PATH} "${pcdir}")
run(pkg-config --cflags --libs bnorm)
string(STRIP "${last_output}" flags)
separate_arguments(flags UNIX_COMMAND "${flags}")
file(GLOB libdir ${prefix}/lib*/libbnorm.so ${prefix}/lib/*/libbnorm.so)
get_filename_component(libdir "${libdir}" DIRECTORY)
run(${C_COMPILER} ${SOURCE_DIR}/c_api.c ${flags} -lm -Wl,-rpath,${libdir} -o ${WORK_DIR}/c_api_pc)
run(${WORK_DIR}/c_api_pc)
