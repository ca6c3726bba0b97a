/* The tile configuration of the AMX kernel (amx_linear.c) and of the prompt attention it runs
   (prompt_attention.h): all eight tiles 16 rows of 64 bytes. */
#ifndef REGISTRY_AMX_TILES_H
#define REGISTRY_AMX_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* in a product: tiles 0-3 float32 accumulators (16 n x 16 m), 4, 5 weight rows, 6, 7 packed X; in the
   prompt attention: see prompt_attention.h.
   Not GCC's _tile_loadconfig: its asm declares a read of the configuration's first 8 bytes only, so the
   compiler may drop or delay the stores to the rest (a build whose loop schedule changed loaded a
   garbage configuration and faulted). This asm reads the whole 64 bytes and is ordered with memory. */
static void configure_tiles(void) {
    tile_config config __attribute__((aligned(64)));
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    __asm__ volatile("ldtilecfg %0" : : "m"(config) : "memory");
}

/* GCC's tile loads do not declare that they read memory, so the compiler may move ordinary stores past
   them: call this between writing data with C (or AVX-512) stores and loading it into tiles. (A tile
   store declares its write, and a call or an OpenMP barrier orders memory too.) */
static inline void tiles_read_memory_after_this(void) { __asm__ volatile("" : : : "memory"); }

#endif
