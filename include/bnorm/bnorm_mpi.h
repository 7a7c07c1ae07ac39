/* bnorm_mpi: synchronized batch normalization across the ranks of an MPI
 * communicator, for data-parallel training. Built with -DBNORM_MPI=ON as the
 * target bnorm::bnorm_mpi of the bnorm package; it is the split-phase API of
 * bnorm.h with one exchange of per-channel statistics between the phases.
 *
 * Both functions are collective over `comm`: every rank of it calls them, in
 * the same order, with the same c, spatial, layout, eps and flags (checked),
 * and for backward the same gamma, mean and var (not checked). Each rank
 * passes its own slice of the batch: local_shape->n may differ between ranks
 * and may be 0, and where local_shape->n * local_shape->spatial == 0 the
 * tensor arguments (x, y, dy, dx, relu_mask) may be NULL. The batch is the
 * concatenation of the slices in rank order.
 *
 * Results. mean, var, dgamma and dbeta are those of the whole batch, bitwise
 * the same on every rank and from run to run. y and dx are this rank's slice
 * of what bnorm_forward_training and bnorm_backward give on the whole batch,
 * up to rounding (the statistics are added in another order); bitwise equal
 * to them when one rank holds the whole batch. The ReLU mask indexes the local
 * tensor, as in bnorm.h.
 *
 * Cost. Per call, one MPI_Allreduce of 14 int64 (the ranks agree that the
 * arguments are valid) and one MPI_Allgather of 2*c + 1 doubles per rank,
 * whatever the batch size; backward with BNORM_GLOBAL_STATS and no dgamma or
 * dbeta needs only the first.
 *
 * Errors. Every rank returns the same status and, on error, writes nothing:
 * each rank checks its arguments, then the ranks agree before anything is
 * written. An invalid argument on any rank, or c, spatial, layout, eps or
 * flags that differ between ranks, give BNORM_INVALID_ARGUMENT; scratch that
 * cannot be allocated on any rank gives BNORM_OUT_OF_MEMORY. The exceptions:
 *  - comm == MPI_COMM_NULL or an intercommunicator: BNORM_INVALID_ARGUMENT on
 *    this rank, with no communication;
 *  - MPI not initialized, or finalized: BNORM_UNSUPPORTED on this rank;
 *  - a failed MPI call: BNORM_UNSUPPORTED, possibly on some ranks only. Only
 *    seen if comm's error handler returns errors; with MPI_ERRORS_ARE_FATAL,
 *    the default, MPI aborts instead;
 *  - the last, local pass (normalize, backward apply) running out of memory:
 *    BNORM_OUT_OF_MEMORY on that rank only, the others succeed.
 * Every failure sets bnorm_last_error_message() on each rank that returns
 * it: this rank's own reason, or that another rank's arguments were invalid
 * (or its allocation failed), or which of c, spatial, layout, eps and flags
 * differ between the ranks; a success clears it.
 *
 * Threads. The calling thread makes MPI calls on comm itself (no duplicate),
 * so MPI must be initialized with a thread level that allows it, and no other
 * thread may start a collective on comm meanwhile. bnorm's OpenMP threads
 * never call MPI. */
#ifndef BNORM_BNORM_MPI_H
#define BNORM_BNORM_MPI_H

#include <mpi.h>

#include "bnorm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* bnorm_forward_training over the batch of all ranks: mean and var (length
 * c) are the global batch statistics, y (and with BNORM_FUSE_RELU the mask)
 * the local slice of the output. y may equal x. A global batch with no values
 * (every rank's n*spatial == 0) is BNORM_INVALID_ARGUMENT, as in bnorm.h. */
BNORM_API bnorm_status bnorm_mpi_forward_training(MPI_Comm comm, const bnorm_shape* local_shape,
                                                  float eps, unsigned flags, const float* x,
                                                  const float* gamma, const float* beta, float* y,
                                                  float* mean, float* var, uint8_t* relu_mask);

/* bnorm_backward over the batch of all ranks: dx is the local slice, dgamma
 * and dbeta (length c, each may be NULL) the global sums. dx may equal dy.
 * With BNORM_GLOBAL_STATS dx is local (gamma*invstd*dy) and dgamma, dbeta are
 * still global; then whether dgamma or dbeta is requested must be the same on
 * every rank. */
BNORM_API bnorm_status bnorm_mpi_backward(MPI_Comm comm, const bnorm_shape* local_shape, float eps,
                                          unsigned flags, const float* x, const float* dy,
                                          const float* gamma, const float* mean, const float* var,
                                          const uint8_t* relu_mask, float* dx, float* dgamma,
                                          float* dbeta);

#ifdef __cplusplus
}
#endif

#endif /* BNORM_BNORM_MPI_H */
