/* chatbuild's Q8 matrix product for CPU serving (chatbuild/engines/q8.py builds and loads this file).
 *
 * y[m, n] = sum over blocks b of  dw[n, b] * dx[m, b] * <qw[n, b, :], qx[m, b, :]>
 *
 * Weights are int8 in blocks of QK = 32 along the input dimension, each block with its own fp32
 * scale (absmax / 127), quantized once when the server loads. Activations are quantized the same way
 * on every call, so each block's dot product is exact integer arithmetic and only the two scales
 * are floating point. The block format is GGML's Q8_0 (llama.cpp), as is the AVX2 idea of taking the
 * absolute value of one operand and moving its sign onto the other, so that `maddubs` (unsigned x
 * signed bytes) can multiply two signed vectors without overflow (|products| <= 2 * 127 * 127).
 * Without AVX2 the same sums run as plain loops. Threads: OpenMP over output rows, as many as the
 * caller asks (torch.get_num_threads()); loaded after torch, this library shares torch's libgomp. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32

/* Quantize `rows` x `k` fp32 values into int8 blocks and their scales (round half away from zero). */
void q8_quantize(const float *x, int64_t rows, int64_t k, int8_t *q, float *d) {
    int64_t blocks = rows * (k / QK);
    for (int64_t i = 0; i < blocks; i++) {
        const float *v = x + i * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        float scale = amax / 127.f, inverse = scale > 0.f ? 1.f / scale : 0.f;
        d[i] = scale;
        for (int j = 0; j < QK; j++) q[i * QK + j] = (int8_t)roundf(v[j] * inverse);
    }
}

#ifdef __AVX2__
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 int32 partial sums of <w, x> over one block; |w| is precomputed, sign(x, w) moves w's sign. */
static inline __m256 block_dot(__m256i abs_w, __m256i w, const int8_t *x) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    __m256i pairs = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(xv, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

/* One output column n for activation rows m0..m0+count-1 (count <= 4). */
static void column(const int8_t *qx, const float *dx, int64_t m0, int count, int64_t k,
                   const int8_t *wr, const float *dwr, int64_t n, int64_t n_total, float *y) {
    int64_t blocks = k / QK;
#ifdef __AVX2__
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < blocks; b++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(wr + b * QK));
        __m256i abs_w = _mm256_sign_epi8(w, w);
        for (int i = 0; i < count; i++) {
            int64_t m = m0 + i;
            __m256 scale = _mm256_set1_ps(dwr[b] * dx[m * blocks + b]);
            acc[i] = _mm256_fmadd_ps(block_dot(abs_w, w, qx + m * k + b * QK), scale, acc[i]);
        }
    }
    for (int i = 0; i < count; i++) y[(m0 + i) * n_total + n] = sum8(acc[i]);
#else
    for (int i = 0; i < count; i++) {
        int64_t m = m0 + i;
        float acc = 0.f;
        for (int64_t b = 0; b < blocks; b++) {
            int32_t dot = 0;
            for (int j = 0; j < QK; j++) dot += (int32_t)wr[b * QK + j] * (int32_t)qx[m * k + b * QK + j];
            acc += dwr[b] * dx[m * blocks + b] * (float)dot;
        }
        y[m * n_total + n] = acc;
    }
#endif
}

/* y [m, n] = x [m, k] times the packed weight [n, k] transposed. k must be a multiple of QK.
 * Returns 0, or -1 if scratch memory could not be allocated. */
int q8_matmul(const float *x, int64_t m, int64_t k, const int8_t *qw, const float *dw, int64_t n,
              float *y, int threads) {
    int64_t blocks = k / QK;
    int8_t *qx = malloc((size_t)(m * k));
    float *dx = malloc((size_t)(m * blocks) * sizeof(float));
    if (!qx || !dx) { free(qx); free(dx); return -1; }
    q8_quantize(x, m, k, qx, dx);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < n; j++) {
        for (int64_t i = 0; i < m; i += 4) {
            int count = m - i < 4 ? (int)(m - i) : 4;
            column(qx, dx, i, count, k, qw + j * k, dw + j * blocks, j, n, y);
        }
    }
    free(qx);
    free(dx);
    return 0;
}
