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
   prompt attention: see prompt_attention.h */
static void configure_tiles(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

#endif
