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
#include <stdint.h>

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

/* Y = X W^T + bias on `threads` OpenMP threads (torch's count). X: M x K, W: N x K, Y: M x N, rows
   contiguous with strides ldx, ldw, ldy; bias (N) or NULL. Any M >= 1, N >= 1, K >= 1. */
void registry_linear_f32(const float* X, int64_t M, int64_t ldx, const float* W, int64_t N, int64_t K, int64_t ldw,
                         const float* bias, float* Y, int64_t ldy, int threads) {
    const int64_t blocks = N / 3;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) rows_of_w(X, M, ldx, W, ldw, K, bias, Y, ldy, 3 * b, 3);
        #pragma omp single
        {
            if (N % 3 == 2) rows_of_w(X, M, ldx, W, ldw, K, bias, Y, ldy, N - 2, 2);
            if (N % 3 == 1) rows_of_w(X, M, ldx, W, ldw, K, bias, Y, ldy, N - 1, 1);
        }
    }
}
