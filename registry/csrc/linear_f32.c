/* float32 linear layers for a few rows (a decode step of a batch): Y = X W^T + bias.

   X is M x K (2 <= M <= 16 is what it is for), W is N x K (an nn.Linear weight, read where it lies), Y is
   M x N; rows contiguous (strides ld*). For so few rows the product is a stream of W: MKL's GEMM reads
   it at a third of the memory bandwidth at 8 rows (it repacks W on every call), this at 85-95% of what
   its own matrix-vector product reads. Each thread takes a contiguous range of W's rows, three at a
   time; each group of up to 8 rows of X is multiplied with those three, the first group while they
   stream in from memory, the others from the core's cache. A software prefetch ahead in each of the
   three row streams keeps enough reads in flight (without it: 23 against 27-28 GB/s on the machine
   of docs/benchmarks.md).

   The sums are float32 in another order than MKL's: results differ from F.linear's by rounding
   (about 1e-7 relative), not bit for bit. */
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "decode_attention.h"
#include "scratch.h"
#include "vector_math.h"

/* how far ahead (floats) each weight row's stream is prefetched: 12 KiB for rows of up to 2048 values,
   48 KiB for longer ones. Measured over a bloom-560m layer sequence at 8 rows (GB/s, 1024 / 4096
   values a row): 6 KiB 19-20 / 22; 12 KiB 23-24.5 / 20.5-21; 18 KiB 22-24 / 23-24.6; 24 KiB and more
   21.5-23 / 22-23 (an earlier session). A later A/B over the same sequence, variants alternating in one
   process (ms for the 24 mlp-down layers): 18 KiB 19.6, 32 KiB 19.2, 48 KiB 17.8, 64 KiB 18.2 */
#define PREFETCH_SHORT_ROWS 3072
#define PREFETCH_LONG_ROWS 12288
#define GROUP 8             /* rows of X per pass: 3 x 8 accumulators fill 24 of the 32 registers */

/* 1 if this CPU has AVX-512F (and the OS saves its registers), else 0 */
int registry_avx512_ready(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0; /* OSXSAVE */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((b >> 16) & 1)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6) == 0xe6; /* SSE, AVX, opmask and both halves of the ZMM state enabled */
}

/* rows n .. n+R-1 of W against rows m0 .. m0+G-1 of X -> Y (plus bias); R and G are constants where
   this is inlined, so the accumulators stay in registers */
static inline __attribute__((always_inline)) void block(const float* X, int64_t ldx, const float* W, int64_t ldw,
                                                       int64_t K, const float* bias, float* Y, int64_t ldy,
                                                       int64_t n, int64_t m0, const int R, const int G,
                                                       const int prefetch) {
    __m512 acc[3][GROUP];
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) acc[r][g] = _mm512_setzero_ps();
    const float* w = W + n * ldw;
    const float* x = X + m0 * ldx;
    const int64_t ahead = K > 2048 ? PREFETCH_LONG_ROWS : PREFETCH_SHORT_ROWS;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[3];
        for (int r = 0; r < R; r++) {
            if (prefetch) _mm_prefetch((const char*)(w + r * ldw + k + ahead), _MM_HINT_T0);
            wv[r] = _mm512_loadu_ps(w + r * ldw + k);
        }
        for (int g = 0; g < G; g++) {
            const __m512 xv = _mm512_loadu_ps(x + g * ldx + k);
            for (int r = 0; r < R; r++) acc[r][g] = _mm512_fmadd_ps(wv[r], xv, acc[r][g]);
        }
    }
    if (k < K) { /* the last K % 16 values */
        const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[3];
        for (int r = 0; r < R; r++) wv[r] = _mm512_maskz_loadu_ps(mask, w + r * ldw + k);
        for (int g = 0; g < G; g++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + g * ldx + k);
            for (int r = 0; r < R; r++) acc[r][g] = _mm512_fmadd_ps(wv[r], xv, acc[r][g]);
        }
    }
    for (int r = 0; r < R; r++) {
        const float b = bias ? bias[n + r] : 0.0f;
        for (int g = 0; g < G; g++) Y[(m0 + g) * ldy + n + r] = _mm512_reduce_add_ps(acc[r][g]) + b;
    }
}

/* R rows of W against all M rows of X, in groups of up to GROUP; only the first group prefetches (the
   others find the rows in cache) */
static inline __attribute__((always_inline)) void rows_of_w(const float* X, int64_t M, int64_t ldx, const float* W,
                                                           int64_t ldw, int64_t K, const float* bias, float* Y,
                                                           int64_t ldy, int64_t n, const int R) {
    for (int64_t m0 = 0; m0 < M; m0 += GROUP) {
        const int prefetch = m0 == 0;
        switch (M - m0 < GROUP ? M - m0 : GROUP) {
        case 1: block(X, ldx, W, ldw, K, bias, Y, ldy, n, m0, R, 1, prefetch); break;
        case 2: block(X, ldx, W, ldw, K, bias, Y, ldy, n, m0, R, 2, prefetch); break;
        case 3: block(X, ldx, W, ldw, K, bias, Y, ldy, n, m0, R, 3, prefetch); break;
        case 4: block(X, ldx, W, ldw, K, bias, Y, ldy, n, m0, R, 4, prefetch); break;
        case 5: block(X, ldx, W, ldw, K, bias, Y, ldy, n, m0, R, 5, prefetch); break;
        case 6: block(X, ldx, W, ldw, K, bias, Y, ldy, n, m0, R, 6, prefetch); break;
        case 7: block(X, ldx, W, ldw, K, bias, Y, ldy, n, m0, R, 7, prefetch); break;
        default: block(X, ldx, W, ldw, K, bias, Y, ldy, n, m0, R, 8, prefetch); break;
        }
    }
}

typedef struct {
    const float* bias;
    int act;          /* ACT_* of vector_math.h */
    const float* R;   /* residual, added last, or NULL */
    int64_t ldr;
} epilogue_f32;

/* rows m of Y, columns [n0, n1): act(y) + R, in place (the bias is added with the sums) */
static void finish_columns(float* Y, int64_t ldy, int64_t M, int64_t n0, int64_t n1, const epilogue_f32* e) {
    if (e->act == ACT_NONE && e->R == NULL) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n += 16) {
            const __mmask16 mask = n1 - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n1 - n)) - 1);
            __m512 v = activate(_mm512_maskz_loadu_ps(mask, Y + m * ldy + n), e->act);
            if (e->R) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, e->R + m * e->ldr + n));
            _mm512_mask_storeu_ps(Y + m * ldy + n, mask, v);
        }
}

/* Y = act(X W^T + bias) + R, called by every thread of a parallel region: each thread takes a contiguous
   range of W's rows (three at a time; the last thread the N % 3 left), then finishes its own columns
   while they are in its cache. Ends in a barrier: Y is complete when it returns. */
static void product_f32(const float* X, int64_t M, int64_t ldx, const float* W, int64_t N, int64_t K, int64_t ldw,
                        float* Y, int64_t ldy, const epilogue_f32* e) {
    const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads(), blocks = N / 3;
    const int64_t b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
    for (int64_t b = b0; b < b1; b++) rows_of_w(X, M, ldx, W, ldw, K, e->bias, Y, ldy, 3 * b, 3);
    int64_t n1 = 3 * b1;
    if (t == threads - 1) {
        if (N % 3 == 2) rows_of_w(X, M, ldx, W, ldw, K, e->bias, Y, ldy, N - 2, 2);
        if (N % 3 == 1) rows_of_w(X, M, ldx, W, ldw, K, e->bias, Y, ldy, N - 1, 1);
        n1 = N;
    }
    finish_columns(Y, ldy, M, 3 * b0, n1, e);
    #pragma omp barrier
}

/* Y = X W^T + bias on `threads` OpenMP threads (torch's count). X: M x K, W: N x K, Y: M x N, rows
   contiguous with strides ldx, ldw, ldy; bias (N) or NULL. Any M >= 1, N >= 1, K >= 1. */
void registry_linear_f32(const float* X, int64_t M, int64_t ldx, const float* W, int64_t N, int64_t K, int64_t ldw,
                         const float* bias, float* Y, int64_t ldy, int threads) {
    const epilogue_f32 e = {bias, ACT_NONE, NULL, 0};
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    product_f32(X, M, ldx, W, N, K, ldw, Y, ldy, &e);
}

static inline __m512 load_f32_at(const void* row, int64_t k) { return _mm512_loadu_ps((const float*)row + k); }

static inline void store_f32_at(void* row, int64_t k, __m512 v) { _mm512_storeu_ps((float*)row + k, v); }

/* rows of X (K values, K % 16 == 0) -> LayerNorm(X) rows of Y (see layer_norm_moments). Called by every
   thread of a parallel region; ends in a barrier. */
static void layer_norm_rows_f32(const float* X, int64_t M, int64_t ldx, int64_t K, const float* gamma,
                                const float* beta, float eps, float* Y, int64_t ldy) {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) layer_norm_row(X + m * ldx, K, gamma, beta, eps, load_f32_at, store_f32_at, Y + m * ldy);
}

/* registry_chain_bf16 (amx_linear.c) in float32, for a few rows: the steps of a transformer block between
   two attentions' cores in one parallel region. Every step but the first layer is optional:
     S  = (X W0^T + b0) + R0               if W0 (N0 x K0)
     H  = LayerNorm(S)                     if gamma (S: X without W0; K1 % 16 == 0)
     Y1 = act1(H W1^T + b1) + R1           W1: N1 x K1 (K1 = N0 with W0)
     Y2 = (Y1 W2^T + b2) + R2              if W2 (N2 x N1)
     Y3 = LayerNorm3(Y) W3^T + b3          if W3 (N3 x width of Y; that width % 16 == 0)
   With W0, the residual of the last of Y1, Y2 is S and R1, R2 are ignored. Y (the last of Y1, Y2) and Y3
   are the caller's; S, H, Y1 before Y2 and LayerNorm3(Y) live in the calling thread's scratch. Rows
   contiguous: X (stride ldx), R0 (N0), R1 (N1), R2 (N2), Y, Y3 (N3). Returns 0, or -1 if the scratch
   memory could not be allocated (nothing written). */
int registry_chain_f32(const float* X, int64_t M, int64_t ldx, const float* W0, int64_t N0, int64_t K0, int64_t ldw0,
                       const float* b0, const float* R0, const float* gamma, const float* beta, float eps,
                       const float* W1, int64_t N1, int64_t K1, int64_t ldw1, const float* b1, int act1,
                       const float* R1, const float* W2, int64_t N2, int64_t ldw2, const float* b2, const float* R2,
                       float* Y, const float* gamma3, const float* beta3, float eps3, const float* W3, int64_t N3,
                       int64_t ldw3, const float* b3, float* Y3, int threads) {
    const int64_t NY = W2 != NULL ? N2 : N1;
    const chain_layout at = chain_scratch(M, W0 != NULL, N0, gamma != NULL, K1, W2 != NULL, N1, W3 != NULL, NY);
    float* const between = registry_scratch(SCRATCH_CHAIN_F32, (size_t)at.total * sizeof(float));
    if (between == NULL) return -1;
    float *const S = W0 != NULL ? between + at.s : NULL, *const Xn = between + at.h;
    float *const Y1 = W2 != NULL ? between + at.y1 : Y, *const H3 = between + at.h3;
    if (W0 != NULL) {
        if (W2 != NULL) R2 = S;
        else R1 = S;
    }
    const epilogue_f32 e0 = {b0, ACT_NONE, R0, N0}, e1 = {b1, act1, R1, N1}, e2 = {b2, ACT_NONE, R2, N2},
                       e3 = {b3, ACT_NONE, NULL, 0};
    const float* const In = W0 != NULL ? S : X;
    const int64_t ldin = W0 != NULL ? N0 : ldx;
    const float* const H = gamma != NULL ? Xn : In;
    const int64_t ldh = gamma != NULL ? K1 : ldin;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        if (W0 != NULL) product_f32(X, M, ldx, W0, N0, K0, ldw0, S, N0, &e0);
        if (gamma != NULL) layer_norm_rows_f32(In, M, ldin, K1, gamma, beta, eps, Xn, K1);
        product_f32(H, M, ldh, W1, N1, K1, ldw1, Y1, N1, &e1);
        if (W2 != NULL) product_f32(Y1, M, N1, W2, N2, N1, ldw2, Y, N2, &e2);
        if (W3 != NULL) {
            layer_norm_rows_f32(Y, M, NY, NY, gamma3, beta3, eps3, H3, NY);
            product_f32(H3, M, NY, W3, N3, NY, ldw3, Y3, N3, &e3);
        }
    }
    return 0;
}

DEFINE_ATTENTION(attend_f32, float, 0, dot_f32, _mm512_loadu_ps, store_f32_16)

/* registry_decode_bf16 (amx_linear.c) in float32: a step of a pre-LayerNorm decoder's L blocks in one
   parallel region, the attention as decode_attention.h computes it for a float32 model, token by token
   (M x tokens at most 16 rows); same arguments (float32 tensors; scores: at least position + tokens + 16
   floats per thread). Returns 0; -1 if the scratch memory could not be allocated, -2 if ld_scores is too
   small (nothing written either way). */
int registry_decode_f32(const decode_layer* layers, int64_t L, float* X, int64_t M, int64_t tokens, int64_t C,
                        int64_t F, int64_t H, int64_t D, int act, int64_t head_stride, int64_t q_offset,
                        int64_t k_offset, int64_t v_offset, int64_t sb, int64_t sh, int64_t sp, int64_t position,
                        const float* slopes, const float* key_pos, int64_t ld_pos, const uint8_t* valid,
                        int64_t ld_valid, float scale, float* qkv, float* att, float* scores, int64_t ld_scores,
                        int threads) {
    const int64_t C3 = 3 * C, R = M * tokens;
    if (ld_scores < position + tokens + 16) return -2;
    const chain_layout at = chain_scratch(R, 1, C, 1, C, 1, F, 1, C);
    float* const between = registry_scratch(SCRATCH_CHAIN_F32, (size_t)at.total * sizeof(float));
    if (between == NULL) return -1;
    float *const S = between + at.s, *const Hn = between + at.h, *const Y1 = between + at.y1;
    float* const H3 = between + at.h3;
    const decode_attention shared = {qkv, C3, head_stride, q_offset, k_offset, v_offset, NULL, NULL, sb, sh, sp,
                                     position, slopes, key_pos, ld_pos, valid, ld_valid, scale, att, C};
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float* const my_scores = scores + omp_get_thread_num() * ld_scores;
        for (int64_t l = 0; l < L; l++) {
            const decode_layer* const y = &layers[l];
            if (l == 0) { /* later blocks' projections are computed at the end of the block before */
                const epilogue_f32 eq = {y->qkv_b, ACT_NONE, NULL, 0};
                layer_norm_rows_f32(X, R, C, C, y->norm_w, y->norm_b, y->norm_eps, H3, C);
                product_f32(H3, R, C, y->qkv_w, C3, C, C, qkv, C3, &eq);
            }
            attend_f32(&shared, y->keys, y->values, M, tokens, H, D, my_scores);
            const epilogue_f32 e0 = {y->dense_b, ACT_NONE, X, C}, e1 = {y->up_b, act, NULL, 0},
                               e2 = {y->down_b, ACT_NONE, S, C};
            product_f32(att, R, C, y->dense_w, C, C, C, S, C, &e0);
            layer_norm_rows_f32(S, R, C, C, y->post_w, y->post_b, y->post_eps, Hn, C);
            product_f32(Hn, R, C, y->up_w, F, C, C, Y1, F, &e1);
            product_f32(Y1, R, F, y->down_w, C, F, F, X, C, &e2);
            if (l + 1 < L) {
                const decode_layer* const z = &layers[l + 1];
                const epilogue_f32 eq = {z->qkv_b, ACT_NONE, NULL, 0};
                layer_norm_rows_f32(X, R, C, C, z->norm_w, z->norm_b, z->norm_eps, H3, C);
                product_f32(H3, R, C, z->qkv_w, C3, C, C, qkv, C3, &eq);
            }
        }
    }
    return 0;
}
