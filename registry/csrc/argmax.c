/* The index of each row's maximum, for greedy decoding: the first maximal value, or the first NaN where a
   row holds one (torch.argmax's answer, and torch.max's indices). float32 or bfloat16 scores, AVX-512F.

   PyTorch's CPU reductions take 0.2 ms for one bfloat16 row of 250880 logits and 0.8 ms for eight (0.8
   ns a value); this reads them at memory speed. Each row is split into one part per thread when there
   are fewer rows than threads; the parts' answers are combined in order, so the first maximum wins.
   Built by registry/avx512.py with the other kernels (registry/native.py). */
#include <immintrin.h>
#include <stdint.h>

typedef struct {
    float value;
    int64_t index; /* -1: no value seen */
    int nan;       /* index is the part's first NaN */
} part_answer;

static inline __m512 load16(const void* row, int bf16, int64_t k) {
    if (bf16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)row + k))), 16));
    return _mm512_loadu_ps((const float*)row + k);
}

static inline __m512 load16_masked(const void* row, int bf16, int64_t k, __mmask16 mask) {
    const __m512 minus_inf = _mm512_set1_ps(-__builtin_inff());
    if (bf16) {
        const __m512 v = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t*)row + k)), 16));
        return _mm512_mask_blend_ps(mask, minus_inf, v);
    }
    return _mm512_mask_loadu_ps(minus_inf, mask, (const float*)row + k);
}

/* values [k0, k1) of a row: the first maximum, or the first NaN */
static part_answer scan(const void* row, int bf16, int64_t k0, int64_t k1) {
    part_answer answer = {-__builtin_inff(), -1, 0};
    if (k0 >= k1) return answer;
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 best = _mm512_set1_ps(-__builtin_inff());
    __m512i best_at = _mm512_set1_epi32(INT32_MAX); /* offsets from k0; lanes never set lose every tie */
    int64_t k = k0;
    for (; k < k1; k += 16) {
        const int64_t left = k1 - k;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __m512 v = left >= 16 ? load16(row, bf16, k) : load16_masked(row, bf16, k, mask);
        const __mmask16 nan = _mm512_mask_cmp_ps_mask(mask, v, v, _CMP_UNORD_Q);
        if (nan) {
            answer.index = k + __builtin_ctz(nan);
            answer.nan = 1;
            return answer;
        }
        /* a lane keeps its first maximum: it moves only on a strictly greater value, or on its first
           value at all (an all -inf row still answers its first index) */
        const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32((int)(k - k0)));
        const __mmask16 unset = _mm512_cmpeq_epi32_mask(best_at, _mm512_set1_epi32(INT32_MAX));
        const __mmask16 take = (_mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | unset) & mask;
        best = _mm512_mask_blend_ps(take, best, v);
        best_at = _mm512_mask_blend_epi32(take, best_at, at);
    }
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    const __m512i candidates = _mm512_mask_blend_epi32(tops, _mm512_set1_epi32(INT32_MAX), best_at);
    answer.value = top;
    answer.index = k0 + _mm512_reduce_min_epi32(candidates);
    return answer;
}

/* out[m] = the index of row m's first maximum (or first NaN); rows of N values, ldx apart; bf16: the
   values are bfloat16, else float32. Threads: OpenMP, as the linear kernels. Parts of at most 64
   answers per row are combined. */
void registry_argmax_rows(const void* X, int bf16, int64_t M, int64_t N, int64_t ldx, int64_t* out, int threads) {
    if (M <= 0 || N <= 0) return;
    if (threads < 1) threads = 1;
    int64_t parts = M < threads ? (threads + M - 1) / M : 1;
    if (parts > 64) parts = 64;
    if (parts > N / 4096) parts = N / 4096 > 1 ? N / 4096 : 1; /* parts of 4096 values at least: a parallel
                                                                   region costs more than a shorter scan */
    part_answer answers[64];
    const size_t size = bf16 ? 2 : 4;
    for (int64_t m0 = 0; m0 < M; m0 += 64 / parts) {
        const int64_t rows = M - m0 < 64 / parts ? M - m0 : 64 / parts, tasks = rows * parts;
        #pragma omp parallel for num_threads(threads) schedule(static) if (tasks > 1)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t m = m0 + t / parts, p = t % parts, span = (N + parts - 1) / parts;
            const int64_t k0 = p * span, k1 = k0 + span < N ? k0 + span : N;
            answers[t] = scan((const char*)X + m * ldx * size, bf16, k0, k1);
        }
        for (int64_t r = 0; r < rows; r++) {
            part_answer best = answers[r * parts];
            for (int64_t p = 1; p < parts && !best.nan; p++) {
                const part_answer next = answers[r * parts + p];
                if (next.index < 0) continue;
                if (next.nan || best.index < 0 || next.value > best.value) best = next;
            }
            out[m0 + r] = best.index < 0 ? 0 : best.index;
        }
    }
}
