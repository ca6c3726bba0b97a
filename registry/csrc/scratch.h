/* Scratch memory of the calling thread, for the kernels' packed operands and a chain's intermediate
   results: one buffer per region, grown to the largest size asked for, 64-byte aligned, and freed when
   the thread ends (a thread-specific key with a destructor: servers start threads per request). */
#ifndef REGISTRY_SCRATCH_H
#define REGISTRY_SCRATCH_H

#include <stddef.h>
#include <stdint.h>

enum { SCRATCH_PACKED_ROWS = 0, SCRATCH_CHAIN_BF16 = 1, SCRATCH_CHAIN_F32 = 2, SCRATCH_REGIONS = 3 };

/* at least `bytes` bytes of region `region` for the calling thread (its contents are not kept across
   calls that grow it), or NULL if the memory could not be allocated */
void* registry_scratch(int region, size_t bytes);

/* where a chain (registry_chain_bf16, registry_chain_f32) keeps its intermediate results in its scratch
   region, in values from its start: S (M x N0, with a projection), H (M x K1, with a LayerNorm), Y1
   (M x N1, before a second layer) and LayerNorm3(Y) (M x NY, with a next projection); total: the sum */
typedef struct {
    int64_t s, h, y1, h3, total;
} chain_layout;

static inline chain_layout chain_scratch(int64_t M, int project, int64_t N0, int norm, int64_t K1, int second,
                                         int64_t N1, int then, int64_t NY) {
    chain_layout layout;
    layout.s = 0;
    layout.h = layout.s + (project ? M * N0 : 0);
    layout.y1 = layout.h + (norm ? M * K1 : 0);
    layout.h3 = layout.y1 + (second ? M * N1 : 0);
    layout.total = layout.h3 + (then ? M * NY : 0);
    return layout;
}

#endif
