/* Scratch memory of the calling thread, for the kernels' packed operands and a chain's intermediate
   results: one buffer per region, grown to the largest size asked for, 64-byte aligned, and freed when
   the thread ends (a thread-specific key with a destructor: servers start threads per request). */
#ifndef REGISTRY_SCRATCH_H
#define REGISTRY_SCRATCH_H

#include <stddef.h>

enum { SCRATCH_PACKED_ROWS = 0, SCRATCH_CHAIN_BF16 = 1, SCRATCH_CHAIN_F32 = 2, SCRATCH_REGIONS = 3 };

/* at least `bytes` bytes of region `region` for the calling thread (its contents are not kept across
   calls that grow it), or NULL if the memory could not be allocated */
void* registry_scratch(int region, size_t bytes);

#endif
