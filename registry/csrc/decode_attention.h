/* Attention of a step's new tokens over their cached keys and values, one token at a time, for a step run
   inside a kernel (registry_decode_bf16 in amx_linear.c for a decode step, registry_decode_f32 in
   linear_f32.c for any step; a bfloat16 prompt has prompt_attention.h): the new key and value are
   written into the cache, then softmax(scale q.k + bias) v over every position up to the token's, as
   PyTorch's scaled_dot_product_attention computes it with an additive float mask in the model's dtype:
   scores and softmax in float32, the bias and mask added as one value per key in that dtype (bfloat16:
   the bias rounded to it; a masked key takes the dtype's lowest value, whatever its bias). Included by
   both kernels; registry/native.py hashes it with them. */
#ifndef REGISTRY_DECODE_ATTENTION_H
#define REGISTRY_DECODE_ATTENTION_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"

#define BF16_LOWEST (-3.38953139e38f) /* torch.finfo(torch.bfloat16).min: a masked key's additive value */
#define F32_LOWEST (-3.40282347e38f)  /* torch.finfo(torch.float32).min */

/* where a step's attention reads and writes (one layer); element type: the kernel's (bfloat16 or float32) */
typedef struct {
    const void* qkv; /* the new tokens' projections, one row of `ld_qkv` values per token (b * tokens + t) */
    int64_t ld_qkv, head_stride, q_offset, k_offset, v_offset; /* head h: q at h * head_stride + q_offset */
    void *keys, *values; /* the cache: [b][h][position][d] at b * sb + h * sh + position * sp + d */
    int64_t sb, sh, sp;
    int64_t position;     /* the slot of a sequence's first new token (each attends to the slots up to its own) */
    const float* slopes;  /* ALiBi slopes (heads), or NULL: no bias */
    const float* key_pos; /* ALiBi key positions, `ld_pos` per sequence (with slopes) */
    int64_t ld_pos;
    const uint8_t* valid; /* 1 where a key may be attended to, `ld_valid` per sequence; NULL: every key */
    int64_t ld_valid;
    float scale;
    void* out; /* heads merged: out[row * ld_out + h * D + d] */
    int64_t ld_out;
} decode_attention;

/* One block's parameters and cache buffers for registry_decode_bf16 / registry_decode_f32 (element type the
   kernel's; registry/chains.py mirrors it) */
typedef struct {
    const void *norm_w, *norm_b, *qkv_w, *qkv_b, *dense_w, *dense_b, *post_w, *post_b, *up_w, *up_b, *down_w,
        *down_b;
    void *keys, *values;
    float norm_eps, post_eps;
} decode_layer;

static inline float bf16_round(float v) { /* to the nearest bfloat16 (ties to even), as a float */
    const __m512 r = _mm512_set1_ps(v);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(r);
    return _mm512_cvtss_f32(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}

static inline __m512 widen_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

/* the additive value of key j for sequence b, head h: the mask's lowest value where the key is masked,
   else the ALiBi bias (rounded to bfloat16 for a bfloat16 model), else 0 */
static inline float key_bias(const decode_attention* a, int64_t b, int64_t h, int64_t j, int bf16) {
    if (a->valid != NULL && !a->valid[b * a->ld_valid + j]) return bf16 ? BF16_LOWEST : F32_LOWEST;
    if (a->slopes == NULL) return 0.0f;
    const float bias = a->slopes[h] * a->key_pos[b * a->ld_pos + j];
    return bf16 ? bf16_round(bias) : bias;
}

/* scores[0 .. n) -> exp(score - top), zero where that underflows (a masked key); returns 1 / their sum */
static inline float softmax_numerators(float* scores, int64_t n, float top) {
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
    return 1.0f / _mm512_reduce_add_ps(total);
}

/* the keys and values of row j of the pair at `next_keys`/`next_values` (or none), into the caches */
static inline void prefetch_row(const char* next_keys, const char* next_values, int64_t j, int64_t stride_bytes,
                                int64_t row_bytes) {
    if (next_keys == NULL) return;
    for (int64_t byte = 0; byte < row_bytes; byte += 64) {
        _mm_prefetch(next_keys + j * stride_bytes + byte, _MM_HINT_T0);
        _mm_prefetch(next_values + j * stride_bytes + byte, _MM_HINT_T0);
    }
}

/* NAME##_one: sequence b, head h, the new token of projection row `row` at cache slot `slot` (it attends to
   slots 0 .. slot), element type T (uint16_t: bfloat16, or float), D % 16 == 0 and D <= 256; `scores`:
   room for slot + 17 floats. `next` (b, h of the pair this thread attends next, or b < 0): its keys and
   values are prefetched while these are read, so that they stream in behind them instead of each pair
   waiting for memory at its start.
   NAME: every (sequence, head) pair of M sequences of `tokens` new tokens each (rows b * tokens + t, at
   slots position + t, one after another) and H heads, in the layer's cache buffers `keys` and `values`,
   shared by the threads of a parallel region (each with its own `scores`); ends in a barrier. */
#define DEFINE_ATTENTION(NAME, T, BF16, DOT, WIDEN, STORE)                                                     \
    static inline void NAME##_one(const decode_attention* a, int64_t b, int64_t r, int64_t slot, int64_t h,      \
                                  int64_t D, float* scores, int64_t next_b, int64_t next_h) {                 \
        const T* row = (const T*)a->qkv + r * a->ld_qkv + h * a->head_stride;                                 \
        const T *q = row + a->q_offset, *k_new = row + a->k_offset, *v_new = row + a->v_offset;               \
        T *keys = (T*)a->keys + b * a->sb + h * a->sh, *values = (T*)a->values + b * a->sb + h * a->sh;       \
        memcpy(keys + slot * a->sp, k_new, (size_t)D * sizeof(T));                                            \
        memcpy(values + slot * a->sp, v_new, (size_t)D * sizeof(T));                                          \
        const int64_t n = slot + 1, row_bytes = D * (int64_t)sizeof(T);                                \
        const int64_t stride_bytes = a->sp * (int64_t)sizeof(T);                                              \
        const char *next_keys = NULL, *next_values = NULL;                                                    \
        if (next_b >= 0) {                                                                                    \
            next_keys = (const char*)((const T*)a->keys + next_b * a->sb + next_h * a->sh);                   \
            next_values = (const char*)((const T*)a->values + next_b * a->sb + next_h * a->sh);               \
        }                                                                                                     \
        float top = -INFINITY;                                                                                \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            prefetch_row(next_keys, next_values, j, stride_bytes, row_bytes);                                 \
            const float s = DOT(q, keys + j * a->sp, D) * a->scale + key_bias(a, b, h, j, BF16);              \
            scores[j] = s;                                                                                    \
            if (s > top) top = s;                                                                             \
        }                                                                                                     \
        const __m512 inverse = _mm512_set1_ps(softmax_numerators(scores, n, top));                            \
        __m512 acc[16];                                                                                       \
        const int64_t parts = D / 16;                                                                         \
        for (int64_t i = 0; i < parts; i++) acc[i] = _mm512_setzero_ps();                                     \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            if (scores[j] == 0.0f) continue;                                                                  \
            const __m512 p = _mm512_set1_ps(scores[j]);                                                       \
            const T* value = values + j * a->sp;                                                              \
            for (int64_t i = 0; i < parts; i++) acc[i] = _mm512_fmadd_ps(p, WIDEN(value + 16 * i), acc[i]);   \
        }                                                                                                     \
        T* out = (T*)a->out + r * a->ld_out + h * D;                                                          \
        for (int64_t i = 0; i < parts; i++) STORE(out + 16 * i, _mm512_mul_ps(acc[i], inverse));              \
    }                                                                                                         \
    static void NAME(const decode_attention* shared, void* keys, void* values, int64_t M, int64_t tokens,      \
                     int64_t H, int64_t D, float* scores) {                                                   \
        decode_attention a = *shared;                                                                         \
        a.keys = keys;                                                                                        \
        a.values = values;                                                                                    \
        _Pragma("omp for schedule(static)") for (int64_t bh = 0; bh < M * H; bh++) {                          \
            const int64_t b = bh / H, h = bh % H, next = bh + 1 < M * H ? bh + 1 : -1;                        \
            for (int64_t t = 0; t + 1 < tokens; t++)                                                          \
                NAME##_one(&a, b, b * tokens + t, a.position + t, h, D, scores, -1, 0);                       \
            NAME##_one(&a, b, b * tokens + tokens - 1, a.position + tokens - 1, h, D, scores,                 \
                       next >= 0 ? next / H : -1, next >= 0 ? next % H : 0);                                  \
        }                                                                                                     \
    }

static inline float dot_bf16(const uint16_t* q, const uint16_t* k, int64_t D) { /* D % 16 == 0 */
    __m512 acc = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= D; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(k + d));
    if (d < D) { /* the last 16 values: the other 16 pairs' lanes read as zero */
        const __mmask32 half = 0xffff;
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(half, q + d),
                               (__m512bh)_mm512_maskz_loadu_epi16(half, k + d));
    }
    return _mm512_reduce_add_ps(acc);
}

static inline float dot_f32(const float* q, const float* k, int64_t D) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
    return _mm512_reduce_add_ps(acc);
}

static inline void store_bf16_16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }

static inline void store_f32_16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

#endif
