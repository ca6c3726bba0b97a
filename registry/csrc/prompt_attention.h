/* Attention of several new tokens per sequence (a prompt, or a chunk of one) in bfloat16 on AMX tiles, for
   registry_decode_bf16 (amx_linear.c). Each query is what decode_attention.h computes for one new token:
   token t of a sequence, at cache slot position + t, attends to slots 0 .. position + t (causal), with
   the same bias and mask per key, scores and softmax in float32. The work is blocked by (sequence, head)
   pair, 16 queries at a time, as two tile products:
   - scores = Q K^T: the queries' rows (16 x 32 values a tile) against the pair's keys, packed once into
     32-bit pairs of values, 16 keys to a row (the tile layout of the second operand), only the key
     blocks a query block can see;
   - out = P V: the softmax numerators of the 16 queries, rounded to bfloat16 (16 x 32 keys a tile), against
     the values packed into pairs of keys. That rounding is what PyTorch's flash attention for the CPU
     does in bfloat16; the float32 sum of the unrounded numerators normalises, as there. (A decode step's
     loop keeps the numerators in float32.)
   Tiles: 0-3 accumulators, 4 the first operand, 5-7 the second (amx_tiles.h's configuration). */
#ifndef REGISTRY_PROMPT_ATTENTION_H
#define REGISTRY_PROMPT_ATTENTION_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "amx_tiles.h"
#include "decode_attention.h"
#include "vector_math.h"

/* a pair's work space, in floats from its start, for S keys (S32: rounded up to 32) of head size D (D32:
   rounded up to 32; P16: its D / 2 pairs rounded up to 16) */
typedef struct {
    int64_t S32, D32, P16;
    int64_t bias, scores, keys, values, probs, queries, tiles, total;
} prompt_work;

static inline prompt_work prompt_work_layout(int64_t S, int64_t D) {
    prompt_work w;
    w.S32 = (S + 31) / 32 * 32;
    w.D32 = (D + 31) / 32 * 32;
    w.P16 = (D / 2 + 15) / 16 * 16;
    w.bias = 0;                              /* S32 floats: each key's additive value */
    w.scores = w.bias + w.S32;               /* 16 x S32 floats: a query block's scores */
    w.keys = w.scores + 16 * w.S32;          /* S32 / 16 groups x P16 pairs x 16 keys (32-bit pairs) */
    w.values = w.keys + w.S32 * w.P16;       /* S32 / 2 pairs of keys x D (32-bit pairs) */
    w.probs = w.values + w.S32 / 2 * D;      /* 16 x S32 bfloat16: the block's numerators */
    w.queries = w.probs + 8 * w.S32;         /* 16 x D32 bfloat16: the block's queries, zero-padded */
    w.tiles = w.queries + 8 * w.D32;         /* 4 accumulator tiles of 16 x 16 floats, and 16 inverses */
    w.total = w.tiles + 4 * 256 + 16;
    return w;
}

/* floats of work space a thread needs for a pair with S keys of head size D (registry/chains.py sizes its
   buffer by asking registry_prompt_work_floats, in amx_linear.c) */
static inline int64_t prompt_work_floats(int64_t S, int64_t D) { return prompt_work_layout(S, D).total; }

/* kp[(g * P16 + p) * 16 + i] = pair p (values 2p, 2p + 1) of key 16 g + i, for the S32 / 16 groups of 16
   keys: zero past the P = D / 2 pairs and past key S */
static void pack_keys(const uint16_t* keys, int64_t sp, int64_t S, int64_t S32, int64_t P, int64_t P16, uint32_t* kp) {
    for (int64_t g = 0; 16 * g < S32; g++)
        for (int64_t p0 = 0; p0 < P16; p0 += 16) {
            const int64_t width = P - p0 >= 16 ? 16 : P - p0 > 0 ? P - p0 : 0;
            const __mmask16 columns = (__mmask16)((1u << width) - 1);
            __m512 r[16], column[16];
            for (int64_t i = 0; i < 16; i++)
                r[i] = 16 * g + i < S ? _mm512_maskz_loadu_ps(columns, keys + (16 * g + i) * sp + 2 * p0)
                                      : _mm512_setzero_ps();
            transpose_registers(r, column);
            for (int64_t c = 0; c < 16; c++) _mm512_storeu_ps((float*)kp + (g * P16 + p0 + c) * 16, column[c]);
        }
}

/* vp[k * D + d] = (value 2k at d, value 2k + 1 at d) for the S32 / 2 pairs of keys (zero past key S) */
static void pack_values(const uint16_t* values, int64_t sp, int64_t S, int64_t S32, int64_t D, uint32_t* vp) {
    static const uint16_t interleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i order = _mm512_loadu_si512(interleave);
    for (int64_t k = 0; 2 * k < S32; k++) {
        const uint16_t *first = values + 2 * k * sp, *second = first + sp;
        for (int64_t d = 0; d < D; d += 16) {
            const __m256i a = 2 * k < S ? _mm256_loadu_si256((const __m256i*)(first + d)) : _mm256_setzero_si256();
            const __m256i b = 2 * k + 1 < S ? _mm256_loadu_si256((const __m256i*)(second + d)) : _mm256_setzero_si256();
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
            _mm512_storeu_si512(vp + k * D + d, _mm512_permutexvar_epi16(order, both));
        }
    }
}

/* bias[j] = key_bias(a, b, h, j, bfloat16) for the S keys, 16 at a time */
static void key_biases(const decode_attention* a, int64_t b, int64_t h, int64_t S, float* bias) {
    for (int64_t j = 0; j < S; j += 16) {
        const __mmask16 live = S - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - j)) - 1);
        __m512 v = _mm512_setzero_ps();
        if (a->slopes != NULL) {
            v = _mm512_mul_ps(_mm512_set1_ps(a->slopes[h]), _mm512_maskz_loadu_ps(live, a->key_pos + b * a->ld_pos + j));
            const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(v);
            v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16));
        }
        if (a->valid != NULL) {
            const __m128i ok = _mm_maskz_loadu_epi8(live, a->valid + b * a->ld_valid + j);
            v = _mm512_mask_mov_ps(v, _mm_mask_testn_epi8_mask(live, ok, ok), _mm512_set1_ps(BF16_LOWEST));
        }
        _mm512_mask_storeu_ps(bias + j, live, v);
    }
}

/* one query's row: dots -> scale * dot + bias for keys j < n, then the softmax numerators, rounded to
   bfloat16 into `probs` up to `width` keys (zero from n on); returns 1 / the float32 sum */
static inline float query_probabilities(float* row, const float* bias, float scale, int64_t n, int64_t width,
                                        uint16_t* probs) {
    const __m512 scale_v = _mm512_set1_ps(scale);
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 live = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __m512 s = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, row + j), scale_v),
                                       _mm512_maskz_loadu_ps(live, bias + j));
        _mm512_mask_storeu_ps(row + j, live, s);
        top = _mm512_mask_max_ps(top, live, top, s);
    }
    const float inverse = softmax_numerators(row, n, _mm512_reduce_max_ps(top));
    for (int64_t j = 0; j < width; j += 32) {
        const int64_t left = n - j;
        const __mmask16 low = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        const __mmask16 high = left >= 32 ? (__mmask16)0xffff : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
        const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(high, row + j + 16), _mm512_maskz_loadu_ps(low, row + j));
        _mm512_storeu_si512(probs + j, (__m512i)pair);
    }
    return inverse;
}

/* accumulator tile J += the block's numerators for keys 32c .. 32c + 31 (tile 4, loaded by the caller) x
   the values' pairs of keys 16c .. 16c + 15 at d0 + 16 J (into tile B) */
#define VALUES_STEP(J, B)                                                        \
    if (tiles > J) {                                                             \
        _tile_loadd(B, vp + 16 * c * D + d0 + 16 * J, (int)(D * sizeof(uint32_t))); \
        _tile_dpbf16ps(J, 4, B);                                                 \
    }
#define STORE_TILE(J)                                                      \
    if (tiles > J) _tile_stored(J, (float*)work + w.tiles + 256 * J, 64);

/* sequence b, head h: its `tokens` new keys and values written into the cache at slots position ..
   position + tokens - 1, then each new token's attention (see the top of this file). Tiles configured. */
static void prompt_attention_pair(const decode_attention* a, int64_t b, int64_t h, int64_t tokens, int64_t D,
                                  float* work) {
    const int64_t S = a->position + tokens, P = D / 2;
    const prompt_work w = prompt_work_layout(S, D);
    uint16_t* keys = (uint16_t*)a->keys + b * a->sb + h * a->sh;
    uint16_t* values = (uint16_t*)a->values + b * a->sb + h * a->sh;
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t* row = (const uint16_t*)a->qkv + (b * tokens + t) * a->ld_qkv + h * a->head_stride;
        memcpy(keys + (a->position + t) * a->sp, row + a->k_offset, (size_t)D * sizeof(uint16_t));
        memcpy(values + (a->position + t) * a->sp, row + a->v_offset, (size_t)D * sizeof(uint16_t));
    }
    float *const bias = work + w.bias, *const scores = work + w.scores, *const inverse = work + w.tiles + 1024;
    uint32_t *const kp = (uint32_t*)(work + w.keys), *const vp = (uint32_t*)(work + w.values);
    uint16_t *const probs = (uint16_t*)(work + w.probs), *const queries = (uint16_t*)(work + w.queries);
    pack_keys(keys, a->sp, S, w.S32, P, w.P16, kp);
    pack_values(values, a->sp, S, w.S32, D, vp);
    key_biases(a, b, h, S, bias);
    tiles_read_memory_after_this(); /* the packed keys and values */
    for (int64_t q0 = 0; q0 < tokens; q0 += 16) {
        const int64_t rows = tokens - q0 < 16 ? tokens - q0 : 16;
        const int64_t seen = a->position + q0 + rows, width = (seen + 31) / 32 * 32; /* keys the block sees */
        memset(queries, 0, (size_t)(16 * w.D32) * sizeof(uint16_t));
        for (int64_t r = 0; r < rows; r++)
            memcpy(queries + r * w.D32,
                   (const uint16_t*)a->qkv + (b * tokens + q0 + r) * a->ld_qkv + h * a->head_stride + a->q_offset,
                   (size_t)D * sizeof(uint16_t));
        tiles_read_memory_after_this(); /* the block's queries */
        for (int64_t g = 0; 16 * g < seen; g++) { /* scores of 16 keys: Q (16 x D) times their packed pairs */
            _tile_zero(0);
            for (int64_t d = 0; d < w.D32; d += 32) {
                _tile_loadd(4, queries + d, (int)(w.D32 * sizeof(uint16_t)));
                _tile_loadd(5, kp + (g * w.P16 + d / 2) * 16, 64);
                _tile_dpbf16ps(0, 4, 5);
            }
            _tile_stored(0, scores + 16 * g, (int)(w.S32 * sizeof(float)));
        }
        for (int64_t r = 0; r < 16; r++) {
            if (r < rows)
                inverse[r] = query_probabilities(scores + r * w.S32, bias, a->scale, a->position + q0 + r + 1, width,
                                                 probs + r * w.S32);
            else
                memset(probs + r * w.S32, 0, (size_t)width * sizeof(uint16_t));
        }
        tiles_read_memory_after_this(); /* the block's numerators */
        for (int64_t d0 = 0; d0 < D; d0 += 64) { /* up to four accumulator tiles of 16 values of d */
            const int64_t tiles = (D - d0) / 16 < 4 ? (D - d0) / 16 : 4;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t c = 0; 32 * c < width; c++) {
                _tile_loadd(4, probs + 32 * c, (int)(w.S32 * sizeof(uint16_t)));
                VALUES_STEP(0, 5)
                VALUES_STEP(1, 6)
                VALUES_STEP(2, 7)
                VALUES_STEP(3, 5)
            }
            STORE_TILE(0)
            STORE_TILE(1)
            STORE_TILE(2)
            STORE_TILE(3)
            for (int64_t r = 0; r < rows; r++) {
                uint16_t* out = (uint16_t*)a->out + (b * tokens + q0 + r) * a->ld_out + h * D + d0;
                const __m512 scale = _mm512_set1_ps(inverse[r]);
                for (int64_t j = 0; j < tiles; j++)
                    store_bf16_16(out + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(work + w.tiles + 256 * j + 16 * r), scale));
            }
        }
    }
}

#undef VALUES_STEP
#undef STORE_TILE

/* every (sequence, head) pair of M sequences of `tokens` new tokens each (rows b * tokens + t) and H heads,
   in the layer's cache buffers, shared by the threads of a parallel region (each with its own `work`,
   prompt_work_floats(position + tokens, D) floats); ends in a barrier */
static void prompt_attend_bf16(const decode_attention* shared, void* keys, void* values, int64_t M, int64_t tokens,
                               int64_t H, int64_t D, float* work) {
    decode_attention a = *shared;
    a.keys = keys;
    a.values = values;
    configure_tiles();
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < M * H; bh++) prompt_attention_pair(&a, bh / H, bh % H, tokens, D, work);
    _tile_release();
}

#endif
