/* Vector math shared by the kernels (AVX-512F, float32 lanes): the activations of their epilogues, the
   moments of a LayerNorm and a 16 x 16 transpose. Included by amx_linear.c and linear_f32.c;
   registry/native.py hashes it with them. */
#ifndef REGISTRY_VECTOR_MATH_H
#define REGISTRY_VECTOR_MATH_H

#include <immintrin.h>
#include <stdint.h>

/* activation codes, as registry/amx.py's ACTIVATIONS */
enum { ACT_NONE = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3, ACT_SILU = 4, ACT_TANH = 5 };

/* exp(x) by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (relative error ~1e-7) */
static inline __m512 exp_ps(__m512 x) {
    /* clamped to a finite range; NaN stays NaN (max/min return their second operand when one is NaN) */
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* 1 / d for finite d >= 1: the 14-bit estimate and one Newton step (relative error ~1e-8), far cheaper
   than a division */
static inline __m512 reciprocal_ps(__m512 d) {
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

static inline __m512 sigmoid_ps(__m512 x) { /* exp_ps is finite, so 1 + exp(-x) is in [1, 2e38] */
    return reciprocal_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7) */
static inline __m512 erf_ps(__m512 x) {
    const __m512 z = _mm512_min_ps(_mm512_set1_ps(10.0f), _mm512_abs_ps(x)), one = _mm512_set1_ps(1.0f);
    const __m512 t = reciprocal_ps(_mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), one));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));
    const __m512 y = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), e, one);
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

static inline __m512 activate(__m512 v, int act) {
    switch (act) {
    case ACT_GELU: /* x/2 (1 + erf(x / sqrt 2)) */
        return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v),
                             _mm512_add_ps(_mm512_set1_ps(1.0f),
                                           erf_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)))));
    case ACT_GELU_TANH: { /* x/2 (1 + tanh u) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3) */
        const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
        const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                       _mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v));
        return _mm512_mul_ps(v, sigmoid_ps(_mm512_add_ps(u, u)));
    }
    case ACT_RELU:
        return _mm512_max_ps(_mm512_setzero_ps(), v); /* NaN stays NaN */
    case ACT_SILU:
        return _mm512_mul_ps(v, sigmoid_ps(v));
    case ACT_TANH: {
        /* 2 sigmoid(2x) - 1, which cancels for small |x|: there the series x - x^3/3 + 2x^5/15 - 17x^7/315
           (next term below 1e-12 relative for |x| < 1/16) */
        const __m512 large = _mm512_fmsub_ps(_mm512_set1_ps(2.0f), sigmoid_ps(_mm512_add_ps(v, v)), _mm512_set1_ps(1.0f));
        const __m512 v2 = _mm512_mul_ps(v, v);
        __m512 series = _mm512_set1_ps(-17.0f / 315.0f);
        series = _mm512_fmadd_ps(series, v2, _mm512_set1_ps(2.0f / 15.0f));
        series = _mm512_fmadd_ps(series, v2, _mm512_set1_ps(-1.0f / 3.0f));
        series = _mm512_fmadd_ps(_mm512_mul_ps(series, v2), v, v);
        const __mmask16 small = _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(0.0625f), _CMP_LT_OQ);
        return _mm512_mask_blend_ps(small, large, series);
    }
    default:
        return v;
    }
}

/* a LayerNorm's per-row affine map, x * scale + shift = (x - mean) / sqrt(variance + eps), as PyTorch
   computes it: mean and biased variance in float32 (two passes), rstd = 1 / sqrt(variance + eps),
   scale = rstd, shift = -mean * rstd. K % 16 == 0; load(row, k) gives values k .. k+15 as float32. */
static inline __attribute__((always_inline)) void layer_norm_moments(const void* row, int64_t K, float eps,
                                                                    __m512 (*load)(const void*, int64_t),
                                                                    __m512* scale, __m512* shift) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) sum = _mm512_add_ps(sum, load(row, k));
    const float mean = _mm512_reduce_add_ps(sum) / (float)K;
    const __m512 mean_v = _mm512_set1_ps(mean);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 d = _mm512_sub_ps(load(row, k), mean_v);
        squares = _mm512_fmadd_ps(d, d, squares);
    }
    const float variance = _mm512_reduce_add_ps(squares) / (float)K;
    const float rstd = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss((variance > 0.0f ? variance : 0.0f) + eps)));
    *scale = _mm512_set1_ps(rstd);
    *shift = _mm512_set1_ps(-mean * rstd);
}

/* one row of a LayerNorm: y = (x * scale + shift) * gamma + beta (see layer_norm_moments), with x, gamma
   and beta read by `load` and y written by `store(out, k, values)` */
static inline __attribute__((always_inline)) void layer_norm_row(const void* x, int64_t K, const void* gamma,
                                                                const void* beta, float eps,
                                                                __m512 (*load)(const void*, int64_t),
                                                                void (*store)(void*, int64_t, __m512), void* out) {
    __m512 scale, shift;
    layer_norm_moments(x, K, eps, load, &scale, &shift);
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 normed = _mm512_add_ps(_mm512_mul_ps(load(x, k), scale), shift);
        store(out, k, _mm512_add_ps(_mm512_mul_ps(normed, load(gamma, k)), load(beta, k)));
    }
}

/* the columns of a 16 x 16 matrix of 32-bit values held as 16 rows, with 64 in-register shuffles: unpacks
   make 4 x 4 blocks within each 128-bit lane, then two rounds of lane shuffles transpose the blocks */
static inline void transpose_registers(const __m512 r[16], __m512 column[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) { /* u[4g + c], lane L: column 4L + c of rows 4g .. 4g+3 */
        const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; c++) {
        const __m512 s0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), s1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
        const __m512 s2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
        const __m512 s3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
        column[c] = _mm512_shuffle_f32x4(s0, s2, 0x88);
        column[4 + c] = _mm512_shuffle_f32x4(s0, s2, 0xDD);
        column[8 + c] = _mm512_shuffle_f32x4(s1, s3, 0x88);
        column[12 + c] = _mm512_shuffle_f32x4(s1, s3, 0xDD);
    }
}

#endif
