/* Linear layers in bfloat16 on Intel AMX tiles: Y = act(X W^T + bias) + R.

   X is M x K, W is N x K (an nn.Linear weight, used where it lies: no packed copy), Y and R are M x N; all
   bfloat16, accumulated in float32 and rounded once. The product is computed transposed, C = W X^T, so
   that the weight tiles (16 rows of W x 32 values of k) load straight from W; only X is rearranged, into
   pairs of k along its rows (the tile layout of the B operand). One kernel serves a decode step (a few
   rows, streamed at close to the memory bandwidth; M = 1 as AVX512-BF16 dot products: see one_row) and a
   prompt (M in the hundreds: AMX throughput).

   Threads: OpenMP, the runtime PyTorch itself loads (libgomp.so.1), as many as torch.get_num_threads() says.
   Built by registry/amx.py with gcc on first use; see docs/architecture.md. */
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "amx_tiles.h"
#include "decode_attention.h"
#include "prompt_attention.h"
#include "scratch.h"
#include "vector_math.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define ROW_CHUNK 128 /* rows of X whose packed tiles stay in L2 while a thread's weight rows stream by */
#define K_CHUNK 256   /* k per pass over the row blocks: the 32 weight rows' share (16 KiB) stays in L1 */

/* 1 if this CPU has AMX-BF16 and AVX512-BF16 and the kernel may use the tile registers (Linux asks each
   process to request them), else 0 */
int registry_amx_ready(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const int amx = (d >> 22) & 1 && (d >> 24) & 1, avx512f = (b >> 16) & 1;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    const int avx512_bf16 = (a >> 5) & 1;
    if (!(amx && avx512f && avx512_bf16)) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static inline __m512 load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static inline __m512 load_bf16_masked(const uint16_t* p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

typedef struct {
    const uint16_t *bias, *R;
    int64_t ldr;
    uint16_t* Y;
    int64_t ldy;
    int act;
} epilogue_args;

/* v: float32 sums for row m, outputs n0 .. n0+15 (lanes outside `mask` unused) -> Y[m][n0 ..] */
static inline void finish(__m512 v, int64_t m, int64_t n0, __mmask16 mask, const epilogue_args* e) {
    if (e->bias) v = _mm512_add_ps(v, load_bf16_masked(e->bias + n0, mask));
    v = activate(v, e->act);
    if (e->R) v = _mm512_add_ps(v, load_bf16_masked(e->R + m * e->ldr + n0, mask));
    _mm256_mask_storeu_epi16(e->Y + m * e->ldy + n0, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline void transpose_16x16(const float* acc, __m512 column[16]) { /* rows 16 floats apart */
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(acc + 16 * i);
    transpose_registers(r, column);
}

/* XT[p][m - m0] = (X[m][2p], X[m][2p+1]) as one 32-bit pair, for the 16 rows m0 .. m0+15 (zero from row
   `rows` on) and the 16 pairs p0 .. p0+15: the transpose of X's rows read as pairs */
static inline void pack_16x16(const uint16_t* X, int64_t ldx, int64_t m0, int64_t rows, int64_t p0, uint32_t* XT,
                              int64_t Mp) {
    __m512 r[16], column[16];
    for (int i = 0; i < 16; i++)
        r[i] = m0 + i < rows ? _mm512_loadu_ps(X + (m0 + i) * ldx + 2 * p0) : _mm512_setzero_ps();
    transpose_registers(r, column);
    for (int i = 0; i < 16; i++) _mm512_store_ps(XT + (p0 + i) * Mp + m0, column[i]);
}

/* an accumulator tile stored as acc[n][m] (16 x 16 float32) -> rows m0 .. m0+rows-1 of Y: a few rows are
   gathered, more are transposed */
static inline void finish_tile(const float* acc, int64_t m0, int64_t rows, int64_t n0, const epilogue_args* e) {
    if (rows <= 4) {
        const __m512i column = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
        for (int64_t m = 0; m < rows; m++) finish(_mm512_i32gather_ps(column, acc + m, 4), m0 + m, n0, 0xffff, e);
        return;
    }
    __m512 columns[16];
    transpose_16x16(acc, columns);
    for (int64_t m = 0; m < rows; m++) finish(columns[m], m0 + m, n0, 0xffff, e);
}

/* the last N % 16 outputs (too few for a tile), as AVX512-BF16 dot products */
static void tail_outputs(const uint16_t* X, int64_t M, int64_t ldx, const uint16_t* W, int64_t n0, int64_t N,
                         int64_t K, int64_t ldw, const epilogue_args* e) {
    const __mmask16 mask = (__mmask16)((1u << (N - n0)) - 1);
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float sums[16] __attribute__((aligned(64))) = {0};
        for (int64_t n = n0; n < N; n++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 32)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(W + n * ldw + k),
                                       (__m512bh)_mm512_loadu_si512(X + m * ldx + k));
            sums[n - n0] = _mm512_reduce_add_ps(acc);
        }
        finish(_mm512_load_ps(sums), m, n0, mask, e);
    }
}

/* how far ahead (bfloat16 values) the one-row path prefetches each weight row's stream: 8 KiB, 48 KiB for
   rows longer than 2048 values (the mlp-down layers of bloom-560m) */
#define ONE_ROW_AHEAD 4096
#define ONE_ROW_AHEAD_LONG 24576

/* sums[0..3] = weight rows n .. n+3 . x, as AVX512-BF16 dot products (four row streams, each prefetched) */
static inline void four_dots(const uint16_t* x, const uint16_t* W, int64_t ldw, int64_t K, int64_t n, float* sums) {
    const int64_t ahead = K > 2048 ? ONE_ROW_AHEAD_LONG : ONE_ROW_AHEAD;
    const uint16_t* w = W + n * ldw;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < K; k += 32) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
        for (int r = 0; r < 4; r++) {
            _mm_prefetch((const char*)(w + r * ldw + k + ahead), _MM_HINT_T0);
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * ldw + k), xv);
        }
    }
    for (int r = 0; r < 4; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

/* M = 1 (a decode step of one sequence): a tile multiply would use one of its 16 rows, and the weight's
   16-row tile loads stream slower than plain loads (bloom-560m's layers and head in sequence: 43.7 against
   47.6 ms, AMX tiles against this). Each thread takes a contiguous range of 16-output groups; the sums
   are AVX512-BF16 dot products (float32, as the tiles'), finished by the same epilogue. Called by every
   thread of a parallel region. */
static void one_row(const uint16_t* x, const uint16_t* W, int64_t N, int64_t K, int64_t ldw, const epilogue_args* e) {
    const int64_t groups = N / 16;
    #pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        float sums[16] __attribute__((aligned(64)));
        for (int b = 0; b < 4; b++) four_dots(x, W, ldw, K, 16 * g + 4 * b, sums + 4 * b);
        finish(_mm512_load_ps(sums), 0, 16 * g, (__mmask16)0xffff, e);
    }
    if (16 * groups < N) tail_outputs(x, 1, K, W, 16 * groups, N, K, ldw, e);
}

/* tiles 0-3 += (weight rows w0, w1: 16 each) x (packed rows x, x + 16: 16 each) over k in [k0, k1) */
static inline void accumulate_2x2(const uint16_t* w0, const uint16_t* w1, int64_t sw, const uint32_t* x, int64_t Mp,
                                  int64_t k0, int64_t k1) {
    const int64_t sx = Mp * 4;
    for (int64_t k = k0; k < k1; k += 32) {
        _tile_loadd(4, w0 + k, sw);
        _tile_loadd(6, x + k / 2 * Mp, sx);
        _tile_loadd(5, w1 + k, sw);
        _tile_loadd(7, x + k / 2 * Mp + 16, sx);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

/* 32 weight rows against `blocks` full blocks of 32 packed rows of X, for more than one block: k in chunks
   of K_CHUNK, each chunk swept over all row blocks while its weight tiles stay in L1 (reloaded from L2 for
   every row block, they would halve the AMX rate); the accumulators go to `acc` between chunks */
static void rows_by_blocks(const uint16_t* w0, const uint16_t* w1, int64_t sw, const uint32_t* XT, int64_t Mp,
                           int64_t K, int64_t blocks, float (*acc)[4][256]) {
    for (int64_t kc = 0; kc < K; kc += K_CHUNK) {
        const int64_t ke = kc + K_CHUNK < K ? kc + K_CHUNK : K;
        for (int64_t b = 0; b < blocks; b++) {
            const uint32_t* x = XT + b * 32;
            if (kc == 0) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
            } else {
                _tile_loadd(0, acc[b][0], 64);
                _tile_loadd(1, acc[b][1], 64);
                _tile_loadd(2, acc[b][2], 64);
                _tile_loadd(3, acc[b][3], 64);
            }
            accumulate_2x2(w0, w1, sw, x, Mp, kc, ke);
            _tile_stored(0, acc[b][0], 64);
            _tile_stored(1, acc[b][1], 64);
            _tile_stored(2, acc[b][2], 64);
            _tile_stored(3, acc[b][3], 64);
        }
    }
}

/* the packed rows of X (K/2 x ROW_CHUNK pairs), in the calling thread's scratch */
static uint32_t* packed_rows(int64_t K) {
    return registry_scratch(SCRATCH_PACKED_ROWS, (size_t)((K > 0 ? K : 2) / 2 * ROW_CHUNK) * sizeof(uint32_t));
}

/* `count` bfloat16 values for a chain's intermediate results, in the calling thread's scratch */
static uint16_t* between_buffer(int64_t count) {
    return registry_scratch(SCRATCH_CHAIN_BF16, (size_t)count * sizeof(uint16_t));
}

/* Y = act(X W^T + bias) + R, called by every thread of a parallel region (the work is shared by omp for
   loops, each ending in a barrier: Y is complete when it returns). XT: the packed rows of X, K/2 x ROW_CHUNK
   (unused for one row). */
static void product(const uint16_t* X, int64_t M, int64_t ldx, const uint16_t* W, int64_t N, int64_t K, int64_t ldw,
                    const epilogue_args* e_, uint32_t* XT) {
    if (M == 1) {
        one_row(X, W, N, K, ldw, e_);
        return;
    }
    const epilogue_args e = *e_;
    const int64_t N16 = N / 16 * 16, nblocks = (N16 + 31) / 32, sw = ldw * 2;
    float acc[4][256] __attribute__((aligned(64)));
    float blocked[ROW_CHUNK / 32][4][256] __attribute__((aligned(64)));
    configure_tiles();
    for (int64_t c0 = 0; c0 < M; c0 += ROW_CHUNK) {
        const int64_t rows = M - c0 < ROW_CHUNK ? M - c0 : ROW_CHUNK, Mp = (rows + 15) / 16 * 16, sx = Mp * 4;
        /* X rows c0 .. c0+rows-1 -> XT[p][m] = (X[m][2p], X[m][2p+1]), zero from m = rows to Mp (the loop's
           closing barrier also orders these stores before the tile loads: amx_tiles.h) */
        #pragma omp for schedule(static)
        for (int64_t p0 = 0; p0 < K / 2; p0 += 16)
            for (int64_t m0 = 0; m0 < Mp; m0 += 16) pack_16x16(X + c0 * ldx, ldx, m0, rows, p0, XT, Mp);
        #pragma omp for schedule(static)
        for (int64_t nb = 0; nb < nblocks; nb++) {
            const int64_t n0 = nb * 32;
            const uint16_t *w0 = W + n0 * ldw, *w1 = w0 + 16 * ldw;
            const int two_w = N16 - n0 >= 32;
            int64_t m0 = 0;
            if (two_w && Mp >= 64) { /* the full 32-row blocks, k-chunked; a last 16 rows below */
                const int64_t blocks = Mp / 32;
                rows_by_blocks(w0, w1, sw, XT, Mp, K, blocks, blocked);
                for (int64_t b = 0; b < blocks; b++) {
                    const int64_t left = rows - 32 * b, rows0 = left < 16 ? left : 16;
                    const int64_t rows1 = left - 16 < 16 ? left - 16 : 16;
                    finish_tile(blocked[b][0], c0 + 32 * b, rows0, n0, &e);
                    if (rows1 > 0) finish_tile(blocked[b][1], c0 + 32 * b + 16, rows1, n0, &e);
                    finish_tile(blocked[b][2], c0 + 32 * b, rows0, n0 + 16, &e);
                    if (rows1 > 0) finish_tile(blocked[b][3], c0 + 32 * b + 16, rows1, n0 + 16, &e);
                }
                m0 = blocks * 32;
            }
            for (; m0 < Mp; m0 += 32) {
                const int two_x = Mp - m0 >= 32;
                const uint32_t* x = XT + m0;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                if (two_w && two_x) {
                    accumulate_2x2(w0, w1, sw, x, Mp, 0, K);
                } else if (two_w) {
                    for (int64_t k = 0; k < K; k += 32) {
                        _tile_loadd(4, w0 + k, sw);
                        _tile_loadd(6, x + k / 2 * Mp, sx);
                        _tile_loadd(5, w1 + k, sw);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(2, 5, 6);
                    }
                } else if (two_x) {
                    for (int64_t k = 0; k < K; k += 32) {
                        _tile_loadd(4, w0 + k, sw);
                        _tile_loadd(6, x + k / 2 * Mp, sx);
                        _tile_loadd(7, x + k / 2 * Mp + 16, sx);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                    }
                } else {
                    for (int64_t k = 0; k < K; k += 32) {
                        _tile_loadd(4, w0 + k, sw);
                        _tile_loadd(6, x + k / 2 * Mp, sx);
                        _tile_dpbf16ps(0, 4, 6);
                    }
                }
                _tile_stored(0, acc[0], 64);
                _tile_stored(1, acc[1], 64);
                _tile_stored(2, acc[2], 64);
                _tile_stored(3, acc[3], 64);
                const int64_t left = rows - m0, rows0 = left < 16 ? left : 16, rows1 = left - 16 < 16 ? left - 16 : 16;
                finish_tile(acc[0], c0 + m0, rows0, n0, &e);
                if (two_x && rows1 > 0) finish_tile(acc[1], c0 + m0 + 16, rows1, n0, &e);
                if (two_w) {
                    finish_tile(acc[2], c0 + m0, rows0, n0 + 16, &e);
                    if (two_x && rows1 > 0) finish_tile(acc[3], c0 + m0 + 16, rows1, n0 + 16, &e);
                }
            }
        }
    }
    _tile_release();
    if (N16 < N) tail_outputs(X, M, ldx, W, N16, N, K, ldw, &e);
}

static inline __m512 load_bf16_at(const void* row, int64_t k) { return load_bf16((const uint16_t*)row + k); }

static inline void store_bf16_at(void* row, int64_t k, __m512 v) {
    _mm256_storeu_si256((__m256i*)((uint16_t*)row + k), (__m256i)_mm512_cvtneps_pbh(v));
}

/* rows of X (K values, K % 16 == 0) -> LayerNorm(X) rows of Y (see layer_norm_moments), rounded once to
   bfloat16. Called by every thread of a parallel region; ends in a barrier. */
static void layer_norm_rows(const uint16_t* X, int64_t M, int64_t ldx, int64_t K, const uint16_t* gamma,
                            const uint16_t* beta, float eps, uint16_t* Y, int64_t ldy) {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) layer_norm_row(X + m * ldx, K, gamma, beta, eps, load_bf16_at, store_bf16_at, Y + m * ldy);
}

/* Y = act(X W^T + bias) + R on `threads` OpenMP threads (the caller passes torch's count: OpenMP's own
   default is per calling thread and ignores torch.set_num_threads in threads torch did not start). Requires
   K % 32 == 0, rows of X, W, R, Y contiguous (strides ld*), bias and R optional (NULL). Returns 0, or -1 if
   the scratch memory could not be allocated (nothing written). */
int registry_linear_bf16(const uint16_t* X, int64_t M, int64_t ldx, const uint16_t* W, int64_t N, int64_t K,
                         int64_t ldw, const uint16_t* bias, const uint16_t* R, int64_t ldr, uint16_t* Y, int64_t ldy,
                         int act, int threads) {
    const epilogue_args e = {bias, R, ldr, Y, ldy, act};
    uint32_t* const XT = M == 1 ? NULL : packed_rows(K);
    if (M > 1 && XT == NULL) return -1;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        /* denormals flushed to zero (FTZ) and read as zero (DAZ) in this call: the activations' tails
           (exp and its reciprocal far out) would otherwise produce them, and each costs a microcode
           assist (tanh-GELU 3-5x slower for pre-activations reaching 30-100). Rounding to bfloat16 flushes
           them anyway. The caller's setting is restored. */
        const unsigned int caller_csr = _mm_getcsr();
        _mm_setcsr(caller_csr | 0x8040);
        product(X, M, ldx, W, N, K, ldw, &e, XT);
        _mm_setcsr(caller_csr);
    }
    return 0;
}

/* The steps of a transformer block between two attentions' cores, in one parallel region: nothing else
   runs between them, so the interpreter is not returned to (a weight stream evicts its code and data, and
   each return costs tens of microseconds on the operations after it). Every step is optional but the
   first layer:
     S  = (X W0^T + b0) + R0               if W0 (N0 x K0: the attention's output projection)
     H  = LayerNorm(S)                     if gamma (S: X without W0)
     Y1 = act1(H W1^T + b1) + R1           W1: N1 x K1 (K1 = N0 with W0)
     Y2 = (Y1 W2^T + b2) + R2              if W2 (N2 x N1; N1 % 32 == 0)
     Y3 = LayerNorm3(Y) W3^T + b3          if W3 (N3 x width of Y: the next block's first projection)
   With W0, the residual of Y1 or Y2, whichever is last, is S (a pre-LayerNorm block's second residual)
   and R1, R2 are ignored. Y, the last of Y1 and Y2, and Y3 are the caller's; S, H, Y1 before Y2, and
   LayerNorm3(Y) live in the calling thread's scratch. All row-major with contiguous rows: X (stride ldx),
   R0 (N0), R1 (N1), R2 (N2), Y, Y3 (N3). b*, R* optional. Returns 0, or -1 if the scratch memory could
   not be allocated (nothing written). */
int registry_chain_bf16(const uint16_t* X, int64_t M, int64_t ldx, const uint16_t* W0, int64_t N0, int64_t K0,
                        int64_t ldw0, const uint16_t* b0, const uint16_t* R0, const uint16_t* gamma,
                        const uint16_t* beta, float eps, const uint16_t* W1, int64_t N1, int64_t K1, int64_t ldw1,
                        const uint16_t* b1, int act1, const uint16_t* R1, const uint16_t* W2, int64_t N2,
                        int64_t ldw2, const uint16_t* b2, const uint16_t* R2, uint16_t* Y, const uint16_t* gamma3,
                        const uint16_t* beta3, float eps3, const uint16_t* W3, int64_t N3, int64_t ldw3,
                        const uint16_t* b3, uint16_t* Y3, int threads) {
    const int64_t NY = W2 != NULL ? N2 : N1; /* Y's width */
    int64_t widest = K1;
    if (W0 != NULL && K0 > widest) widest = K0;
    if (W2 != NULL && N1 > widest) widest = N1;
    if (W3 != NULL && NY > widest) widest = NY;
    uint32_t* const XT = M == 1 ? NULL : packed_rows(widest);
    const chain_layout at = chain_scratch(M, W0 != NULL, N0, gamma != NULL, K1, W2 != NULL, N1, W3 != NULL, NY);
    uint16_t* const between = between_buffer(at.total);
    if ((M > 1 && XT == NULL) || between == NULL) return -1;
    uint16_t *const S = W0 != NULL ? between + at.s : NULL, *const Xn = between + at.h;
    uint16_t *const Y1 = W2 != NULL ? between + at.y1 : Y, *const H3 = between + at.h3;
    if (W0 != NULL) {
        if (W2 != NULL) R2 = S;
        else R1 = S;
    }
    const epilogue_args e0 = {b0, R0, N0, S, N0, ACT_NONE}, e1 = {b1, R1, N1, Y1, N1, act1},
                        e2 = {b2, R2, N2, Y, N2, ACT_NONE}, e3 = {b3, NULL, 0, Y3, N3, ACT_NONE};
    const uint16_t* const In = W0 != NULL ? S : X; /* the LayerNorm's input */
    const int64_t ldin = W0 != NULL ? N0 : ldx;
    const uint16_t* const H = gamma != NULL ? Xn : In;
    const int64_t ldh = gamma != NULL ? K1 : ldin;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        const unsigned int caller_csr = _mm_getcsr(); /* as in registry_linear_bf16 */
        _mm_setcsr(caller_csr | 0x8040);
        if (W0 != NULL) product(X, M, ldx, W0, N0, K0, ldw0, &e0, XT);
        if (gamma != NULL) layer_norm_rows(In, M, ldin, K1, gamma, beta, eps, Xn, K1);
        product(H, M, ldh, W1, N1, K1, ldw1, &e1, XT);
        if (W2 != NULL) product(Y1, M, N1, W2, N2, N1, ldw2, &e2, XT);
        if (W3 != NULL) {
            layer_norm_rows(Y, M, NY, NY, gamma3, beta3, eps3, H3, NY);
            product(H3, M, NY, W3, N3, NY, ldw3, &e3, XT);
        }
        _mm_setcsr(caller_csr);
    }
    return 0;
}

DEFINE_ATTENTION(attend_bf16, uint16_t, 1, dot_bf16, widen_bf16, store_bf16_16)

/* floats of work space per thread registry_decode_bf16 needs for a prompt's attention over S keys of head
   size D (the caller sizes `scores` with it) */
int64_t registry_prompt_work_floats(int64_t S, int64_t D) { return prompt_work_floats(S, D); }

/* A decode step of a pre-LayerNorm decoder's L blocks in one parallel region, or a prompt's: each of M
   sequences brings `tokens` new tokens (rows b * tokens + t of X). For each block,
     Q, K, V = LayerNorm(X) Wqkv^T + bqkv          (the block's input LayerNorm and projection)
     A = attention of Q over the cache, K and V written into it first at slots position .. position +
         tokens - 1 (decode_attention.h for one token, prompt_attention.h for more)
     S = A Wdense^T + bdense + X
     X = act(LayerNorm(S) Wup^T + bup) Wdown^T + bdown + S
   X (M tokens x C, contiguous) is the step's input (after the embeddings) and, on return, the last block's
   output. C, F = Wup's rows and K = 3C as the projection's width must be multiples of 32; weights contiguous.
   Head h's query, key and value are at h * head_stride + q/k/v_offset of a projection row; the cache,
   layer by layer, at b * sb + h * sh + slot * sp. qkv (M tokens x 3C), att (M tokens x C) and scores
   (ld_scores floats per thread: at least position + 17 for one token, prompt_work_floats(position +
   tokens, D) for more) are the caller's. Returns 0; -1 if the scratch memory could not be allocated, -2
   if ld_scores is too small (nothing written either way). */
int registry_decode_bf16(const decode_layer* layers, int64_t L, uint16_t* X, int64_t M, int64_t tokens, int64_t C,
                         int64_t F, int64_t H, int64_t D, int act, int64_t head_stride, int64_t q_offset,
                         int64_t k_offset, int64_t v_offset, int64_t sb, int64_t sh, int64_t sp, int64_t position,
                         const float* slopes, const float* key_pos, int64_t ld_pos, const uint8_t* valid,
                         int64_t ld_valid, float scale, uint16_t* qkv, uint16_t* att, float* scores, int64_t ld_scores,
                         int threads) {
    const int64_t C3 = 3 * C, R = M * tokens;
    if (ld_scores < (tokens > 1 ? prompt_work_floats(position + tokens, D) : position + 17)) return -2;
    uint32_t* const XT = R == 1 ? NULL : packed_rows(F > C ? F : C);
    const chain_layout at = chain_scratch(R, 1, C, 1, C, 1, F, 1, C);
    uint16_t* const between = between_buffer(at.total);
    if ((R > 1 && XT == NULL) || between == NULL) return -1;
    uint16_t *const S = between + at.s, *const Hn = between + at.h, *const Y1 = between + at.y1;
    uint16_t* const H3 = between + at.h3;
    const decode_attention shared = {qkv, C3, head_stride, q_offset, k_offset, v_offset, NULL, NULL, sb, sh, sp,
                                     position, slopes, key_pos, ld_pos, valid, ld_valid, scale, att, C};
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        const unsigned int caller_csr = _mm_getcsr(); /* as in registry_linear_bf16 */
        _mm_setcsr(caller_csr | 0x8040);
        float* const my_scores = scores + omp_get_thread_num() * ld_scores;
        for (int64_t l = 0; l < L; l++) {
            const decode_layer* const y = &layers[l];
            if (l == 0) { /* later blocks' projections are computed at the end of the block before */
                const epilogue_args eq = {y->qkv_b, NULL, 0, qkv, C3, ACT_NONE};
                layer_norm_rows(X, R, C, C, y->norm_w, y->norm_b, y->norm_eps, H3, C);
                product(H3, R, C, y->qkv_w, C3, C, C, &eq, XT);
            }
            if (tokens > 1)
                prompt_attend_bf16(&shared, y->keys, y->values, M, tokens, H, D, my_scores);
            else
                attend_bf16(&shared, y->keys, y->values, M, 1, H, D, my_scores);
            const epilogue_args e0 = {y->dense_b, X, C, S, C, ACT_NONE}, e1 = {y->up_b, NULL, 0, Y1, F, act},
                                e2 = {y->down_b, S, C, X, C, ACT_NONE};
            product(att, R, C, y->dense_w, C, C, C, &e0, XT);
            layer_norm_rows(S, R, C, C, y->post_w, y->post_b, y->post_eps, Hn, C);
            product(Hn, R, C, y->up_w, F, C, C, &e1, XT);
            product(Y1, R, F, y->down_w, C, F, F, &e2, XT);
            if (l + 1 < L) {
                const decode_layer* const z = &layers[l + 1];
                const epilogue_args eq = {z->qkv_b, NULL, 0, qkv, C3, ACT_NONE};
                layer_norm_rows(X, R, C, C, z->norm_w, z->norm_b, z->norm_eps, H3, C);
                product(H3, R, C, z->qkv_w, C3, C, C, &eq, XT);
            }
        }
        _mm_setcsr(caller_csr);
    }
    return 0;
}
