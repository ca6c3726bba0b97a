/* Per-thread scratch memory for the kernels: see scratch.h. */
#include "scratch.h"

#include <pthread.h>
#include <stdlib.h>

typedef struct {
    void* data[SCRATCH_REGIONS];
    size_t capacity[SCRATCH_REGIONS];
} scratch_buffers;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok = 0;

static void free_scratch(void* p) {
    scratch_buffers* s = p;
    for (int r = 0; r < SCRATCH_REGIONS; r++) free(s->data[r]);
    free(s);
}

static void make_scratch_key(void) { scratch_key_ok = pthread_key_create(&scratch_key, free_scratch) == 0; }

void* registry_scratch(int region, size_t bytes) {
    if (region < 0 || region >= SCRATCH_REGIONS) return NULL;
    pthread_once(&scratch_once, make_scratch_key);
    if (!scratch_key_ok) return NULL;
    scratch_buffers* s = pthread_getspecific(scratch_key);
    if (s == NULL) {
        s = calloc(1, sizeof *s);
        if (s == NULL || pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    const size_t needed = (bytes + 63) / 64 * 64;
    if (needed > s->capacity[region] || s->data[region] == NULL) {
        free(s->data[region]);
        s->data[region] = aligned_alloc(64, needed > 64 ? needed : 64);
        s->capacity[region] = s->data[region] ? needed : 0;
    }
    return s->data[region];
}
