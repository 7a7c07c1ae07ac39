# Installs the built bnorm (with bnorm_mpi) into a scratch prefix, builds the
# MPI example and tests against it as a separate project and runs them on 2
# ranks.
file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}")
  endif()
  message(STATUS "ok: ${ARGN}")
endfunction()

run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/build -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_BUILD_TYPE=Release -DEXAMPLE=${EXAMPLE} -DTESTS=${TESTS})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${MPIEXEC} ${WORK_DIR}/build/mpi_training_step)
run(${MPIEXEC} ${WORK_DIR}/build/bnorm_mpi_tests --quick)
