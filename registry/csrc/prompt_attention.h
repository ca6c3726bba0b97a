/* Attention of several new tokens per sequence (a prompt, or a chunk of one) in bfloat16, for
   registry_decode_bf16 (amx_linear.c). Each query is what decode_attention.h computes for one new token:
   token t of a sequence, at cache slot position + t, attends to slots 0 .. position + t (causal), with
   the same bias and mask per key, scores and softmax in float32. The work is blocked by (sequence, head)
   pair instead of token by token:
   - the pair's keys are packed once into 32-bit pairs of values, 16 keys to a vector, so that 16 scores
     are a run of AVX512-BF16 dot products with the query's pairs broadcast (no horizontal sums);
   - its values are packed into pairs of keys, so that the weighted sum over keys is also a run of dot
     products, with the softmax numerators rounded to bfloat16 as its first operand. That rounding is
     what PyTorch's flash attention for the CPU does in bfloat16; the float32 sum of the unrounded
     numerators normalises, as there. (A decode step's loop keeps the numerators in float32.) */
#ifndef REGISTRY_PROMPT_ATTENTION_H
#define REGISTRY_PROMPT_ATTENTION_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "decode_attention.h"
#include "vector_math.h"

/* floats of work space a thread needs for a pair with S keys (slots 0 .. S-1) of head size D: scores and
   biases (S32 each, S rounded up to 32), the packed keys (S32 x D/2 pairs) and values (S32/2 x D pairs).
   registry/chains.py sizes the buffer with the same formula. */
static inline int64_t prompt_work_floats(int64_t S, int64_t D) {
    const int64_t S32 = (S + 31) / 32 * 32;
    return 2 * S32 + S32 * D;
}

/* kp[(g * P + p) * 16 + i] = pair p (values 2p, 2p + 1) of key 16 g + i, for the P = D / 2 pairs of each
   of the S keys (zero from key S to the end of its 16) */
static void pack_keys(const uint16_t* keys, int64_t sp, int64_t S, int64_t P, uint32_t* kp) {
    for (int64_t g = 0; 16 * g < S; g++)
        for (int64_t p0 = 0; p0 < P; p0 += 16) {
            const int64_t width = P - p0 < 16 ? P - p0 : 16;
            const __mmask16 columns = (__mmask16)((1u << width) - 1);
            __m512 r[16], column[16];
            for (int64_t i = 0; i < 16; i++)
                r[i] = 16 * g + i < S ? _mm512_maskz_loadu_ps(columns, keys + (16 * g + i) * sp + 2 * p0)
                                      : _mm512_setzero_ps();
            transpose_registers(r, column);
            for (int64_t c = 0; c < width; c++) _mm512_storeu_ps((float*)kp + (g * P + p0 + c) * 16, column[c]);
        }
}

/* vp[k * D + d] = (value 2k at d, value 2k + 1 at d), for the pairs of keys of the S keys (the second of
   an odd last pair zero) */
static void pack_values(const uint16_t* values, int64_t sp, int64_t S, int64_t D, uint32_t* vp) {
    static const uint16_t interleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i order = _mm512_loadu_si512(interleave);
    for (int64_t k = 0; 2 * k < S; k++) {
        const uint16_t *first = values + 2 * k * sp, *second = first + sp;
        const int paired = 2 * k + 1 < S;
        for (int64_t d = 0; d < D; d += 16) {
            const __m256i a = _mm256_loadu_si256((const __m256i*)(first + d));
            const __m256i b = paired ? _mm256_loadu_si256((const __m256i*)(second + d)) : _mm256_setzero_si256();
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

/* scores[j] = scale q.k_j + bias[j] for keys j < n, 16 at a time (the last 16 written whole); returns the
   largest of the n. q: P pairs; kp: pack_keys's */
static inline float query_scores(const uint32_t* q, const uint32_t* kp, int64_t P, const float* bias, float scale,
                                 int64_t n, float* scores) {
    const __m512 scale_v = _mm512_set1_ps(scale);
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t g = 0; 16 * g < n; g++) {
        const uint32_t* k = kp + g * P * 16;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t p = 0; p < P; p += 4) /* P = D / 2 is a multiple of 8 */
            for (int u = 0; u < 4; u++)
                acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_set1_epi32((int)q[p + u]),
                                          (__m512bh)_mm512_loadu_si512(k + (p + u) * 16));
        const __m512 dot = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        const __m512 s = _mm512_add_ps(_mm512_mul_ps(dot, scale_v), _mm512_loadu_ps(bias + 16 * g));
        _mm512_storeu_ps(scores + 16 * g, s);
        const __mmask16 live = n - 16 * g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - 16 * g)) - 1);
        top = _mm512_mask_max_ps(top, live, top, s);
    }
    return _mm512_reduce_max_ps(top);
}

/* out[0 .. D) = inverse * sum over keys j < n of bfloat16(p_j) v_j, p = scores (softmax numerators); vp:
   pack_values's. `parts` = D / 16 (a constant where inlined for the common head sizes) */
static inline __attribute__((always_inline)) void weighted_values(const float* p, int64_t n, const uint32_t* vp,
                                                                  int64_t D, int64_t parts, float inverse,
                                                                  uint16_t* out) {
    __m512 acc[16];
    for (int64_t d = 0; d < parts; d++) acc[d] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < n; j0 += 32) {
        const int64_t left = n - j0;
        const __mmask16 low = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __mmask16 high = left >= 32 ? (__mmask16)0xffff : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
        uint32_t pairs[16] __attribute__((aligned(64)));
        _mm512_store_si512(pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(high, p + j0 + 16),
                                                               _mm512_maskz_loadu_ps(low, p + j0)));
        const int64_t count = ((left < 32 ? left : 32) + 1) / 2;
        for (int64_t i = 0; i < count; i++) {
            if (pairs[i] == 0) continue; /* two masked keys */
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pairs[i]);
            const uint32_t* v = vp + (j0 / 2 + i) * D;
            for (int64_t d = 0; d < parts; d++)
                acc[d] = _mm512_dpbf16_ps(acc[d], w, (__m512bh)_mm512_loadu_si512(v + 16 * d));
        }
    }
    const __m512 scale = _mm512_set1_ps(inverse);
    for (int64_t d = 0; d < parts; d++) store_bf16_16(out + 16 * d, _mm512_mul_ps(acc[d], scale));
}

/* sequence b, head h: its `tokens` new keys and values written into the cache at slots position ..
   position + tokens - 1, then each new token's attention (see the top of this file) */
static void prompt_attention_pair(const decode_attention* a, int64_t b, int64_t h, int64_t tokens, int64_t D,
                                  float* work) {
    const int64_t S = a->position + tokens, S32 = (S + 31) / 32 * 32, P = D / 2, parts = D / 16;
    uint16_t* keys = (uint16_t*)a->keys + b * a->sb + h * a->sh;
    uint16_t* values = (uint16_t*)a->values + b * a->sb + h * a->sh;
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t* row = (const uint16_t*)a->qkv + (b * tokens + t) * a->ld_qkv + h * a->head_stride;
        memcpy(keys + (a->position + t) * a->sp, row + a->k_offset, (size_t)D * sizeof(uint16_t));
        memcpy(values + (a->position + t) * a->sp, row + a->v_offset, (size_t)D * sizeof(uint16_t));
    }
    float *const scores = work, *const bias = work + S32;
    uint32_t* const kp = (uint32_t*)(bias + S32);
    uint32_t* const vp = kp + S32 * P;
    pack_keys(keys, a->sp, S, P, kp);
    pack_values(values, a->sp, S, D, vp);
    key_biases(a, b, h, S, bias);
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t row = b * tokens + t, n = a->position + t + 1;
        uint32_t q[128];
        memcpy(q, (const uint16_t*)a->qkv + row * a->ld_qkv + h * a->head_stride + a->q_offset,
               (size_t)D * sizeof(uint16_t));
        const float top = query_scores(q, kp, P, bias, a->scale, n, scores);
        const float inverse = softmax_numerators(scores, n, top);
        uint16_t* out = (uint16_t*)a->out + row * a->ld_out + h * D;
        if (parts == 4)
            weighted_values(scores, n, vp, D, 4, inverse, out);
        else if (parts == 8)
            weighted_values(scores, n, vp, D, 8, inverse, out);
        else
            weighted_values(scores, n, vp, D, parts, inverse, out);
    }
}

/* every (sequence, head) pair of M sequences of `tokens` new tokens each (rows b * tokens + t) and H heads,
   in the layer's cache buffers, shared by the threads of a parallel region (each with its own `work`,
   prompt_work_floats(position + tokens, D) floats); ends in a barrier */
static void prompt_attend_bf16(const decode_attention* shared, void* keys, void* values, int64_t M, int64_t tokens,
                               int64_t H, int64_t D, float* work) {
    decode_attention a = *shared;
    a.keys = keys;
    a.values = values;
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < M * H; bh++) prompt_attention_pair(&a, bh / H, bh % H, tokens, D, work);
}

#endif
