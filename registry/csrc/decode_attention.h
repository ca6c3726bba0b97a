/* Attention of one new token per sequence over its cached keys and values (bfloat16), for a decode step
   run inside a kernel (registry_decode_bf16 in amx_linear.c): the new key and value are written into the
   cache, then softmax(scale q.k + bias) v over every cached position, as PyTorch's scaled_dot_product_attention
   computes it for an additive float mask in bfloat16: scores and softmax in float32, the bias and mask
   added as one bfloat16 value per key (the bias rounded to bfloat16; a masked key takes bfloat16's
   lowest value, whatever its bias). Included by amx_linear.c; registry/native.py hashes it with it. */
#ifndef REGISTRY_DECODE_ATTENTION_H
#define REGISTRY_DECODE_ATTENTION_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"

#define BF16_LOWEST (-3.38953139e38f) /* torch.finfo(torch.bfloat16).min: a masked key's additive value */

/* where a step's attention reads and writes (one layer) */
typedef struct {
    const uint16_t* qkv; /* the new tokens' projections, one row of `ld_qkv` values per sequence */
    int64_t ld_qkv, head_stride, q_offset, k_offset, v_offset; /* head h: q at h * head_stride + q_offset */
    uint16_t *keys, *values; /* the cache: [b][h][position][d] at b * sb + h * sh + position * sp + d */
    int64_t sb, sh, sp;
    int64_t position;     /* the slot of the new token: it attends to slots 0 .. position */
    const float* slopes;  /* ALiBi slopes (heads), or NULL: no bias */
    const float* key_pos; /* ALiBi key positions, `ld_pos` per sequence (with slopes) */
    int64_t ld_pos;
    const uint8_t* valid; /* 1 where a key may be attended to, `ld_valid` per sequence; NULL: every key */
    int64_t ld_valid;
    float scale;
    uint16_t* out; /* heads merged: out[b * ld_out + h * D + d] */
    int64_t ld_out;
} decode_attention;

static inline float bf16_round(float v) { /* to the nearest bfloat16 (ties to even), as a float */
    const __m512 r = _mm512_set1_ps(v);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(r);
    return _mm512_cvtss_f32(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}

static inline __m512 widen_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

/* sequence b, head h (D % 32 == 0, D <= 256); `scores`: room for position + 17 floats. `next` (b, h of the
   pair this thread attends next, or b < 0): its keys and values are prefetched while these are read, so
   that they stream in behind them instead of each pair waiting for memory at its start. */
static inline void attend_one(const decode_attention* a, int64_t b, int64_t h, int64_t D, float* scores,
                              int64_t next_b, int64_t next_h) {
    const uint16_t* row = a->qkv + b * a->ld_qkv + h * a->head_stride;
    const uint16_t *q = row + a->q_offset, *k_new = row + a->k_offset, *v_new = row + a->v_offset;
    uint16_t *keys = a->keys + b * a->sb + h * a->sh, *values = a->values + b * a->sb + h * a->sh;
    memcpy(keys + a->position * a->sp, k_new, (size_t)D * sizeof(uint16_t));
    memcpy(values + a->position * a->sp, v_new, (size_t)D * sizeof(uint16_t));
    const int64_t n = a->position + 1;
    const float slope = a->slopes != NULL ? a->slopes[h] : 0.0f;
    const float* pos = a->slopes != NULL ? a->key_pos + b * a->ld_pos : NULL;
    const uint8_t* valid = a->valid != NULL ? a->valid + b * a->ld_valid : NULL;
    const char *next_keys = NULL, *next_values = NULL;
    if (next_b >= 0) {
        next_keys = (const char*)(a->keys + next_b * a->sb + next_h * a->sh);
        next_values = (const char*)(a->values + next_b * a->sb + next_h * a->sh);
    }
    const int64_t row_bytes = D * (int64_t)sizeof(uint16_t), stride_bytes = a->sp * (int64_t)sizeof(uint16_t);
    /* scores: scale q.k in float32, plus the key's bias-and-mask value */
    float top = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        if (next_keys != NULL)
            for (int64_t byte = 0; byte < row_bytes; byte += 64) {
                _mm_prefetch(next_keys + j * stride_bytes + byte, _MM_HINT_T0);
                _mm_prefetch(next_values + j * stride_bytes + byte, _MM_HINT_T0);
            }
        const uint16_t* key = keys + j * a->sp;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 32)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(key + d));
        float s = _mm512_reduce_add_ps(acc) * a->scale;
        if (valid != NULL && !valid[j]) s += BF16_LOWEST;
        else if (pos != NULL) s += bf16_round(slope * pos[j]);
        scores[j] = s;
        if (s > top) top = s;
    }
    /* softmax numerators exp(s - top), zero where exp underflows (a masked key), and their sum */
    const __m512 top_v = _mm512_set1_ps(top), floor_v = _mm512_set1_ps(-87.0f);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 live = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __m512 shifted = _mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + j), top_v);
        const __mmask16 kept = _mm512_mask_cmp_ps_mask(live, shifted, floor_v, _CMP_GE_OQ);
        const __m512 e = _mm512_maskz_mov_ps(kept, exp_ps(shifted));
        _mm512_mask_storeu_ps(scores + j, live, e);
        total = _mm512_add_ps(total, e);
    }
    const float inverse = 1.0f / _mm512_reduce_add_ps(total);
    /* out = sum_j p_j v_j / sum, in float32 */
    __m512 acc[16];
    const int64_t parts = D / 16;
    for (int64_t i = 0; i < parts; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        if (scores[j] == 0.0f) continue;
        const __m512 p = _mm512_set1_ps(scores[j]);
        const uint16_t* value = values + j * a->sp;
        for (int64_t i = 0; i < parts; i++) acc[i] = _mm512_fmadd_ps(p, widen_bf16(value + 16 * i), acc[i]);
    }
    uint16_t* out = a->out + b * a->ld_out + h * D;
    const __m512 inv = _mm512_set1_ps(inverse);
    for (int64_t i = 0; i < parts; i++)
        _mm256_storeu_si256((__m256i*)(out + 16 * i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i], inv)));
}

#endif
