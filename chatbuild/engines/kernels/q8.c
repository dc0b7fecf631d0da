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
 *
 * The AVX2 product reads weights repacked in groups of 8 outputs (`q8_repack`): one 32-byte vector
 * holds 4 inputs of each of 8 outputs, multiplied by the activation's 4 bytes broadcast, so each lane
 * accumulates one output's block dot product in int32 and a block needs one conversion to float per 8
 * outputs instead of one per output. A group's weights are read once for 4 activation rows; leftover
 * rows take the same sums one at a time. Without AVX2 the same sums run as plain loops. Threads:
 * OpenMP over chunks of 64 outputs, as many as the caller asks (torch.get_num_threads()); loaded after
 * torch, this library shares torch's
 * libgomp. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32

/* Round half away from zero, exactly: the truncation plus one step outward when the fraction
 * dropped is at least one half (v - trunc(v) is exact for |v| < 2^23). */
static inline float round_away(float v) {
    float t = truncf(v);
    return fabsf(v - t) >= 0.5f ? t + copysignf(1.f, v) : t;
}

/* Quantize `rows` x `k` fp32 values into int8 blocks and their scales (round half away from zero). */
void q8_quantize(const float *x, int64_t rows, int64_t k, int8_t *q, float *d) {
    int64_t blocks = rows * (k / QK);
    for (int64_t i = 0; i < blocks; i++) {
        const float *v = x + i * QK;
#ifdef __AVX2__
        const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 in[4], amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            in[j] = _mm256_loadu_ps(v + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_and_ps(in[j], magnitude));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        float scale = _mm_cvtss_f32(m) / 127.f, inverse = scale > 0.f ? 1.f / scale : 0.f;
        d[i] = scale;
        const __m256 inv = _mm256_set1_ps(inverse), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
        __m256i ints[4];
        for (int j = 0; j < 4; j++) {
            __m256 s = _mm256_mul_ps(in[j], inv);
            __m256 t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            __m256 up = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(s, t), magnitude), half, _CMP_GE_OQ);
            __m256 step = _mm256_and_ps(up, _mm256_or_ps(one, _mm256_andnot_ps(magnitude, s)));  /* +-1 */
            ints[j] = _mm256_cvttps_epi32(_mm256_add_ps(t, step));
        }
        /* 32 int32 -> 32 int8: the packs interleave 128-bit lanes; the permute puts them back in order */
        __m256i lo = _mm256_packs_epi32(ints[0], ints[1]), hi = _mm256_packs_epi32(ints[2], ints[3]);
        __m256i bytes = _mm256_packs_epi16(lo, hi);
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + i * QK), bytes);
#else
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        float scale = amax / 127.f, inverse = scale > 0.f ? 1.f / scale : 0.f;
        d[i] = scale;
        for (int j = 0; j < QK; j++) q[i * QK + j] = (int8_t)round_away(v[j] * inverse);
#endif
    }
}

#ifdef __AVX2__
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif

/* The weight layout the product reads: outputs in groups of 8, and for each group and block of 32
 * inputs, 8 vectors of 32 bytes, vector c holding inputs 4c..4c+3 of the block for each of the 8
 * outputs (4 bytes an output): rq[((g * blocks + b) * 8 + c) * 32 + o * 4 + j] = q[8g + o, 32b + 4c + j],
 * and the scales rd[(g * blocks + b) * 8 + o] = d[8g + o, b]. Outputs past n (the last group's) are
 * zeros. From q [n, k] int8 and d [n, k / QK] (q8_quantize's). */
void q8_repack(const int8_t *q, const float *d, int64_t n, int64_t k, int8_t *rq, float *rd) {
    int64_t blocks = k / QK, groups = (n + 7) / 8;
    memset(rq, 0, (size_t)(groups * 8 * k));
    memset(rd, 0, (size_t)(groups * 8 * blocks) * sizeof(float));
    for (int64_t o = 0; o < n; o++)
        for (int64_t b = 0; b < blocks; b++) {
            rd[(o / 8 * blocks + b) * 8 + o % 8] = d[o * blocks + b];
            for (int c = 0; c < 8; c++)
                memcpy(rq + ((o / 8 * blocks + b) * 8 + c) * 32 + (o % 8) * 4, q + o * k + b * QK + 4 * c, 4);
        }
}

#define ROWS 4 /* activation rows a group's weights are read for at once */

/* One group of 8 outputs for `count` (<= ROWS) activation rows: out[r * 8 + o]. For each block, the
 * 8 outputs' integer dot products accumulate exactly in int32 lanes (one lane an output: 4 inputs a
 * step, the activation's 4 bytes broadcast), and only then become floats: times the 8 weight scales,
 * times the row's activation scale. (The idea of lanes-as-outputs with the activation broadcast is
 * llama.cpp's repacked "8x8" CPU kernels'.) A row's sums do not depend on the other rows. */
static void group_rows(const int8_t *wg, const float *dg, const int8_t *qx, const float *dx, int64_t k, int count,
                       float *out) {
    int64_t blocks = k / QK;
#ifdef __AVX2__
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f[ROWS];
    for (int r = 0; r < ROWS; r++) f[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i a[ROWS];
        for (int r = 0; r < ROWS; r++) a[r] = _mm256_setzero_si256();
        const int8_t *wb = wg + b * 256;
        for (int c = 0; c < 8; c++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(wb + c * 32)), abs_w = _mm256_sign_epi8(w, w);
            for (int r = 0; r < count; r++) {
                int32_t four;
                memcpy(&four, qx + r * k + b * QK + 4 * c, 4);
                __m256i p = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(_mm256_set1_epi32(four), w));
                a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(p, ones));
            }
        }
        __m256 scales = _mm256_loadu_ps(dg + b * 8);
        for (int r = 0; r < count; r++)
            f[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a[r]), scales), _mm256_set1_ps(dx[r * blocks + b]),
                                   f[r]);
    }
    for (int r = 0; r < count; r++) _mm256_storeu_ps(out + r * 8, f[r]);
#else
    for (int r = 0; r < count; r++)
        for (int o = 0; o < 8; o++) {
            float acc = 0.f;
            for (int64_t b = 0; b < blocks; b++) {
                int32_t dot = 0;
                for (int c = 0; c < 8; c++)
                    for (int j = 0; j < 4; j++)
                        dot += (int32_t)wg[(b * 8 + c) * 32 + o * 4 + j] * (int32_t)qx[r * k + b * QK + 4 * c + j];
                acc += ((float)dot * dg[b * 8 + o]) * dx[r * blocks + b];
            }
            out[r * 8 + o] = acc;
        }
#endif
}

/* <a, b> over k fp32 values, always summed in the same order. */
static float dot_f32(const float *a, const float *b, int64_t k) {
    int64_t j = 0;
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (; j + 32 <= k; j += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 16), _mm256_loadu_ps(b + j + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 24), _mm256_loadu_ps(b + j + 24), acc3);
    }
    float sum = sum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
#else
    float sum = 0.f;
#endif
    for (; j < k; j++) sum += a[j] * b[j];
    return sum;
}

/* row[start..end) += bias (or NULL) + sum over c in lo..hi-1 of t[c] * B[j, c], for each output in
 * this order. B is blocked by 8 outputs: lb[(j / 8) * r * 8 + c * 8 + j % 8], so the terms of 8
 * outputs are 8 consecutive floats and a block of outputs reads its columns sequentially. start is a
 * multiple of 8. */
static void add_terms(float *row, const float *bias, const float *t, const float *lb, int64_t r, int64_t lo,
                      int64_t hi, int64_t start, int64_t end) {
    int64_t j = start;
#ifdef __AVX2__
    for (; j + 32 <= end; j += 32) {  /* four blocks at a time: four independent chains of FMAs */
        const float *block = lb + (j / 8) * r * 8;
        __m256 acc[4];
        for (int v = 0; v < 4; v++) {
            acc[v] = _mm256_loadu_ps(row + j + 8 * v);
            if (bias) acc[v] = _mm256_add_ps(acc[v], _mm256_loadu_ps(bias + j + 8 * v));
        }
        for (int64_t c = lo; c < hi; c++) {
            __m256 s = _mm256_set1_ps(t[c]);
            for (int v = 0; v < 4; v++)
                acc[v] = _mm256_fmadd_ps(s, _mm256_loadu_ps(block + v * r * 8 + c * 8), acc[v]);
        }
        for (int v = 0; v < 4; v++) _mm256_storeu_ps(row + j + 8 * v, acc[v]);
    }
#endif
    for (; j < end; j += 8) {
        int64_t width = end - j < 8 ? end - j : 8;
        const float *block = lb + (j / 8) * r * 8;
        float sums[8];
        for (int v = 0; v < width; v++) sums[v] = row[j + v] + (bias ? bias[j + v] : 0.f);
#ifdef __AVX2__
        __m256 acc = _mm256_loadu_ps(sums);
        for (int64_t c = lo; c < hi; c++) acc = _mm256_fmadd_ps(_mm256_set1_ps(t[c]), _mm256_loadu_ps(block + c * 8), acc);
        _mm256_storeu_ps(sums, acc);
#else
        for (int64_t c = lo; c < hi; c++)
            for (int v = 0; v < 8; v++) sums[v] = fmaf(t[c], block[c * 8 + v], sums[v]);
#endif
        for (int v = 0; v < width; v++) row[j + v] = sums[v];
    }
}

#define CHUNK 64 /* outputs per task: their products, then their bias and low-rank terms */

/* y [m, n] = x [m, k] times the weight [n, k] transposed (qw, dw: repacked by q8_repack), plus
 * `bias` [n] (or NULL), plus LoRA's low-rank terms (or la = NULL): row i of x uses the stacked
 * columns lo[i]..hi[i]-1 of la [r, k] (the A matrices) and B [n, r] (the B matrices side by side,
 * scaling included; blocked as `add_terms` reads it): y[i, j] += sum over c of <x[i, :], la[c, :]> *
 * B[j, c], c in increasing order. A row that uses no adapter has lo[i] == hi[i]. Each output is computed from its own row alone, in an order that
 * does not depend on the other rows, so a row's result is the same in any batch.
 * k must be a multiple of QK. Returns 0, or -1 if scratch memory could not be allocated. */
int q8_matmul(const float *x, int64_t m, int64_t k, const int8_t *qw, const float *dw, int64_t n,
              float *y, int threads, const float *bias, const float *la, const float *lb, int64_t r,
              const int64_t *lo, const int64_t *hi) {
    int64_t blocks = k / QK;
    int8_t *qx = malloc((size_t)(m * k));
    float *dx = malloc((size_t)(m * blocks) * sizeof(float));
    float *t = la ? malloc((size_t)(m * r) * sizeof(float) + 1) : NULL;
    if (!qx || !dx || (la && !t)) { free(qx); free(dx); free(t); return -1; }
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) q8_quantize(x + i * k, 1, k, qx + i * k, dx + i * blocks);
        if (la) {  /* the low-rank inputs t[i, c] = <x[i, :], la[c, :]> of each row's own columns */
            #pragma omp for schedule(static)
            for (int64_t e = 0; e < m * r; e++) {
                int64_t i = e / r, c = e % r;
                if (c >= lo[i] && c < hi[i]) t[e] = dot_f32(x + i * k, la + c * k, k);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < chunks; p++) {
            int64_t start = p * CHUNK, end = start + CHUNK < n ? start + CHUNK : n;
            for (int64_t i = 0; i < m; i += ROWS) {  /* a chunk's weights stay in cache for every tile of rows */
                int count = m - i < ROWS ? (int)(m - i) : ROWS;
                for (int64_t g = start / 8; g * 8 < end; g++) {
                    float out[ROWS * 8];
                    if (count == ROWS)
                        group_rows(qw + g * blocks * 256, dw + g * blocks * 8, qx + i * k, dx + i * blocks, k, ROWS, out);
                    else  /* leftover rows one at a time: the same sums as in a tile */
                        for (int r = 0; r < count; r++)
                            group_rows(qw + g * blocks * 256, dw + g * blocks * 8, qx + (i + r) * k,
                                       dx + (i + r) * blocks, k, 1, out + r * 8);
                    for (int r = 0; r < count; r++)
                        for (int64_t o = 0; o < 8 && g * 8 + o < n; o++) y[(i + r) * n + g * 8 + o] = out[r * 8 + o];
                }
            }
            if (bias || la)
                for (int64_t i = 0; i < m; i++)
                    add_terms(y + i * n, bias, la ? t + i * r : NULL, lb, r, la ? lo[i] : 0, la ? hi[i] : 0,
                              start, end);
        }
    }
    free(qx);
    free(dx);
    free(t);
    return 0;
}

/* ── a whole decode step's layers (the fast decoder's q8 steps) ─────────────────────────────────
 *
 * One new token per row, through every layer of a Llama-family model, in one call: RMSNorm, the
 * fused q/k/v product, rotary embedding (rotate-half form, cos/sin given per row), the token's key
 * and value written into its row's KV slot, attention over the slot's positions 0..pos, the output
 * product, the residual, RMSNorm, the fused gate/up product, SiLU(gate) * up, the down product, the
 * residual. The products are q8_matmul's (LoRA included); everything else is plain fp32 loops, each
 * row on its own, so a row's result does not depend on the other rows. It replaces some sixty small
 * PyTorch calls per layer, each of which would otherwise dispatch from Python and take the GIL back
 * from the server's threads. */
typedef struct {
    const int8_t *w;
    const float *d, *bias, *la, *lb;
    int64_t r, n, k;
    const int64_t *lo, *hi;
} q8_proj;

typedef struct {
    const float *norm1, *norm2;
    float eps1, eps2;
    q8_proj qkv, o, gate_up, down;
    float *keys, *values; /* [slots, kv_heads, capacity, head_dim] */
} q8_layer;

static int proj_matmul(const q8_proj *p, const float *x, int64_t m, float *y, int threads) {
    /* no columns this step (every row bare): no low-rank terms */
    return q8_matmul(x, m, p->k, p->w, p->d, p->n, y, threads, p->bias, p->lo ? p->la : NULL, p->lb, p->r,
                     p->lo, p->hi);
}

static void rms_norm(const float *x, const float *weight, float eps, int64_t m, int64_t d, float *out) {
    for (int64_t i = 0; i < m; i++) {
        const float *v = x + i * d;
        float sum = 0.f;
        for (int64_t j = 0; j < d; j++) sum += v[j] * v[j];
        float scale = 1.f / sqrtf(sum / (float)d + eps);
        for (int64_t j = 0; j < d; j++) out[i * d + j] = weight[j] * (v[j] * scale);
    }
}

/* x [count, head_dim] rotated in place: x * cos + rotate_half(x) * sin */
static void rotate(float *x, int64_t count, int64_t head_dim, const float *cos, const float *sin) {
    int64_t half = head_dim / 2;
    for (int64_t h = 0; h < count; h++) {
        float *v = x + h * head_dim;
        for (int64_t j = 0; j < half; j++) {
            float a = v[j], b = v[j + half];
            v[j] = a * cos[j] - b * sin[j];
            v[j + half] = b * cos[j + half] + a * sin[j + half];
        }
    }
}

int q8_decode(const q8_layer *layers, int64_t count, float *hidden, int64_t m, int64_t d, int64_t heads,
              int64_t kv_heads, int64_t head_dim, int64_t ff, const float *cos, const float *sin,
              const int64_t *slots, const int64_t *positions, int64_t capacity, float scale, int threads) {
    int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    int64_t longest = 0;
    for (int64_t i = 0; i < m; i++) longest = positions[i] + 1 > longest ? positions[i] + 1 : longest;
    float *x = malloc((size_t)(m * d) * sizeof(float));
    float *qkv = malloc((size_t)(m * qkv_size) * sizeof(float));
    float *attended = malloc((size_t)(m * q_size) * sizeof(float));
    float *gate_up = malloc((size_t)(m * 2 * ff) * sizeof(float));
    float *scores = malloc((size_t)(m * heads * longest) * sizeof(float));
    int status = 0;
    if (!x || !qkv || !attended || !gate_up || !scores) status = -1;
    for (int64_t l = 0; l < count && !status; l++) {
        const q8_layer *layer = layers + l;
        rms_norm(hidden, layer->norm1, layer->eps1, m, d, x);
        if ((status = proj_matmul(&layer->qkv, x, m, qkv, threads))) break;
        for (int64_t i = 0; i < m; i++) {  /* rotary, then the new key and value into the row's slot */
            float *row = qkv + i * qkv_size;
            rotate(row, heads + kv_heads, head_dim, cos + i * head_dim, sin + i * head_dim);
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t at = ((slots[i] * kv_heads + h) * capacity + positions[i]) * head_dim;
                for (int64_t j = 0; j < head_dim; j++) {
                    layer->keys[at + j] = row[q_size + h * head_dim + j];
                    layer->values[at + j] = row[q_size + kv_size + h * head_dim + j];
                }
            }
        }
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t task = 0; task < m * heads; task++) {  /* attention: one (row, head) per task */
            int64_t i = task / heads, h = task % heads, g = h / (heads / kv_heads), length = positions[i] + 1;
            const float *q = qkv + i * qkv_size + h * head_dim;
            const float *keys = layer->keys + (slots[i] * kv_heads + g) * capacity * head_dim;
            const float *values = layer->values + (slots[i] * kv_heads + g) * capacity * head_dim;
            float *s = scores + task * longest, top = -INFINITY, total = 0.f;
            for (int64_t c = 0; c < length; c++) {
                s[c] = dot_f32(q, keys + c * head_dim, head_dim) * scale;
                top = s[c] > top ? s[c] : top;
            }
            for (int64_t c = 0; c < length; c++) total += (s[c] = expf(s[c] - top));
            float *out = attended + i * q_size + h * head_dim;
            for (int64_t j = 0; j < head_dim; j++) out[j] = 0.f;
            for (int64_t c = 0; c < length; c++) {
                float w = s[c] / total;
                const float *v = values + c * head_dim;
                for (int64_t j = 0; j < head_dim; j++) out[j] += w * v[j];
            }
        }
        if ((status = proj_matmul(&layer->o, attended, m, x, threads))) break;
        for (int64_t e = 0; e < m * d; e++) hidden[e] += x[e];
        rms_norm(hidden, layer->norm2, layer->eps2, m, d, x);
        if ((status = proj_matmul(&layer->gate_up, x, m, gate_up, threads))) break;
        for (int64_t i = 0; i < m; i++) {  /* SiLU(gate) * up, into the gate half */
            float *g = gate_up + i * 2 * ff, *u = g + ff;
            for (int64_t j = 0; j < ff; j++) g[j] = g[j] / (1.f + expf(-g[j])) * u[j];
        }
        for (int64_t i = 0; i < m; i++)  /* the down product reads rows of 2 * ff: compact them first */
            for (int64_t j = 0; j < ff && i; j++) gate_up[i * ff + j] = gate_up[i * 2 * ff + j];
        if ((status = proj_matmul(&layer->down, gate_up, m, x, threads))) break;
        for (int64_t e = 0; e < m * d; e++) hidden[e] += x[e];
    }
    free(x);
    free(qkv);
    free(attended);
    free(gate_up);
    free(scores);
    return status;
}
