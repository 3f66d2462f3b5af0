/* logitlab's native kernels for the decode step (built and loaded by native.py): the int8-weight
   matrix product and attention of one new token against the KV cache.

   ---- int8-weight matrix product: y[r][o] = scale[o] * sum_i x[r][i] * q[o][i] --------------------

   Decode reads every weight once per token, so it is bound by memory bandwidth. These loops stream
   each int8 weight row once, widen it to float32 in registers and multiply it with float32 activations
   (no rounding of the activations; the only error is the weights' own quantization). Rows of x (at most
   four per call) stay in L1 and reuse every widened weight. OpenMP splits the output rows between
   threads; it shares the OpenMP runtime PyTorch has already loaded (same soname), so the two never run
   competing thread pools. Built by logitlab/model/kernels.py with -O3 -march=native; without AVX-512
   the scalar loop below is what the compiler vectorizes. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float dot_1(const float *x, const int8_t *w, int64_t in) {
    int64_t i = 0;
    float s = 0.f;
#ifdef __AVX512F__
    /* 64 weights per iteration into four independent accumulators (hides the FMA latency) */
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; i + 64 <= in; i += 64) {
        __m512i b = _mm512_loadu_si512((const void *)(w + i));
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(b))),
                             _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 1))),
                             _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 2))),
                             _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 3))),
                             _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= in; i += 16)
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i)))),
                             _mm512_loadu_ps(x + i), a0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    for (; i < in; i++) s += x[i] * (float)w[i];
    return s;
}

/* R (2..4) rows: 32 weights per iteration, two accumulators per row. */
static inline void dot_r(const float *x, const int8_t *w, int64_t in, int R, float *out) {
    int64_t i = 0;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#ifdef __AVX512F__
    __m512 a[4][2];
    for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (; i + 32 <= in; i += 32) {
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + i));
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        for (int r = 0; r < R; r++) {
            a[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * in + i), a[r][0]);
            a[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * in + i + 16), a[r][1]);
        }
    }
    for (int r = 0; r < R; r++) s[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
#endif
    for (; i < in; i++)
        for (int r = 0; r < R; r++) s[r] += x[r * in + i] * (float)w[i];
    for (int r = 0; r < R; r++) out[r] = s[r];
}

/* The matmuls come in two forms. ``*_rows`` is an ORPHANED worksharing loop (``omp for`` with no parallel
   region of its own): called inside a parallel region (the fused decode step, step.c) it splits the output
   rows among that region's threads, with one barrier at its end instead of a fork and a join; called
   outside one, it runs serially. The exported entry points wrap it in ``omp parallel``.
   y[r * y_stride + o] = (acc: +=) the product, for up to 4 rows of x per pass over the weights. */
void q8_matmul_rows(const float *x, int64_t rows, int64_t in, const int8_t *q, const float *scale, int64_t out,
                    float *y, int64_t y_stride, int acc) {
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const int8_t *w = q + o * in;
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
            int R = rows - r0 < 4 ? (int)(rows - r0) : 4;
            float s[4];
            if (R == 1) s[0] = dot_1(x + r0 * in, w, in);
            else dot_r(x + r0 * in, w, in, R, s);
            for (int r = 0; r < R; r++) {
                float *dst = y + (r0 + r) * y_stride + o;
                *dst = acc ? *dst + scale[o] * s[r] : scale[o] * s[r];
            }
        }
    }
}

/* The same product for float32 weights (the default dtype): y[r][o] = sum_i x[r][i] * w[o][i]. */
static inline float dot_f32(const float *x, const float *w, int64_t in) {
    int64_t i = 0;
    float s = 0.f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; i + 64 <= in; i += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= in; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    for (; i < in; i++) s += x[i] * w[i];
    return s;
}

void f32_matmul_rows(const float *x, int64_t rows, int64_t in, const float *w, int64_t out, float *y,
                     int64_t y_stride, int acc) {
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < out; o++)
        for (int64_t r = 0; r < rows; r++) {
            float v = dot_f32(x + r * in, w + o * in, in);
            y[r * y_stride + o] = acc ? y[r * y_stride + o] + v : v;
        }
}

void f32_matmul(const float *x, int64_t rows, int64_t in, const float *w, int64_t out, float *y) {
    #pragma omp parallel
    f32_matmul_rows(x, rows, in, w, out, y, out, 0);
}

/* x [rows, in] float32, q [out, in] int8, scale [out] float32 -> y [rows, out] float32; all contiguous. */
void q8_matmul(const float *x, int64_t rows, int64_t in, const int8_t *q, const float *scale, int64_t out,
               float *y) {
    #pragma omp parallel
    q8_matmul_rows(x, rows, in, q, scale, out, y, out, 0);
}

/* ---- decode attention ------------------------------------------------------------------------------

   One new query token per row against that row's cached keys/values, grouped-query heads:
   out[b][h] = sum_l softmax_l(scale * q[b][h] . k[slot][h/G][l]) v[slot][h/G][l], l < lens[b].
   PyTorch spends most of this step in per-call set-up of tiny batched matmuls (~1.6 us per head and
   row); here each (row, head) pair is one pass over its keys and one over its values. */

#ifdef __AVX512F__
/* e^x for x <= 0 (scores minus their max): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor
   polynomial (relative error < 2e-7), times 2^n. */
static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif



/* Key/value row l of one (row, head): contiguous from base (blocks == NULL), or, in a paged cache, row
   l % bs of block blocks[l / bs], blocks being block_stride floats apart. */
static inline const float *kv_row(const float *base, const int64_t *blocks, int64_t block_stride, int64_t bs,
                                  int64_t l, int64_t D) {
    return blocks ? base + blocks[l / bs] * block_stride + (l % bs) * D : base + l * D;
}

static void attend_one(const float *q, const float *k, const float *v, const int64_t *blocks, int64_t block_stride,
                       int64_t bs, int64_t n, int64_t D, float scale, float *s, float *out) {
    float mx = -INFINITY;
    for (int64_t l = 0; l < n; l++) {
        const float *kl = kv_row(k, blocks, block_stride, bs, l, D);
        float dot = 0.f;
        int64_t d = 0;
#ifdef __AVX512F__
        __m512 a = _mm512_setzero_ps();
        for (; d + 16 <= D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(kl + d), a);
        dot = _mm512_reduce_add_ps(a);
#endif
        for (; d < D; d++) dot += q[d] * kl[d];
        s[l] = dot * scale;
        if (s[l] > mx) mx = s[l];
    }
    float sum = 0.f;
    int64_t l = 0;
#ifdef __AVX512F__
    __m512 vsum = _mm512_setzero_ps(), vmx = _mm512_set1_ps(mx);
    for (; l + 16 <= n; l += 16) {
        __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(s + l), vmx));
        _mm512_storeu_ps(s + l, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (; l < n; l++) {
        s[l] = expf(s[l] - mx);
        sum += s[l];
    }
    float inv = 1.f / sum;
    for (int64_t d = 0; d < D; d++) out[d] = 0.f;
    for (l = 0; l < n; l++) {
        const float *vl = kv_row(v, blocks, block_stride, bs, l, D);
        float p = s[l] * inv;
        int64_t d = 0;
#ifdef __AVX512F__
        __m512 vp = _mm512_set1_ps(p);
        for (; d + 16 <= D; d += 16)
            _mm512_storeu_ps(out + d, _mm512_fmadd_ps(vp, _mm512_loadu_ps(vl + d), _mm512_loadu_ps(out + d)));
#endif
        for (; d < D; d++) out[d] += p * vl[d];
    }
}

/* q: row b, head h at q + b * q_row_stride + h * D.  k_cache, v_cache: one layer, [slots, K, max_pos, D]
   contiguous; row b reads slot slot0 + b.  lens[b] keys (clamped to [1, max_pos]).  out [B, H, D]. */
void attend_decode(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache,
                   int64_t slot0, int64_t B, int64_t H, int64_t K, int64_t max_pos, int64_t D,
                   const int64_t *lens, float scale, float *out) {
    int64_t G = H / K;
    #pragma omp parallel
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)max_pos);
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, h = bh % H;
            int64_t off = ((slot0 + b) * K + h / G) * max_pos * D;
            int64_t n = lens[b] < 1 ? 1 : (lens[b] > max_pos ? max_pos : lens[b]);
            attend_one(q + b * q_row_stride + h * D, k_cache + off, v_cache + off, NULL, 0, n, n, D, scale, s,
                       out + (b * H + h) * D);
        }
        free(s);
    }
}

/* The same over a paged cache: k_pool, v_pool [blocks, K, bs, D] contiguous; row b's positions are in the
   blocks tables[b * width ...] in order; lens[b] keys (clamped to [1, width * bs]).  out [B, H, D].
   ``attend_paged_rows`` is the orphaned loop (see q8_matmul_rows); s: this thread's width * bs scores. */
void attend_paged_rows(const float *q, int64_t q_row_stride, const float *k_pool, const float *v_pool,
                       const int64_t *tables, int64_t width, int64_t bs, int64_t B, int64_t H, int64_t K,
                       int64_t D, const int64_t *lens, float scale, float *out, float *s) {
    int64_t G = H / K, max_pos = width * bs, block_stride = K * bs * D;
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H;
        int64_t n = lens[b] < 1 ? 1 : (lens[b] > max_pos ? max_pos : lens[b]);
        int64_t head = (h / G) * bs * D;  /* this kv head's rows inside a block */
        attend_one(q + b * q_row_stride + h * D, k_pool + head, v_pool + head, tables + b * width, block_stride,
                   bs, n, D, scale, s, out + (b * H + h) * D);
    }
}

void attend_paged(const float *q, int64_t q_row_stride, const float *k_pool, const float *v_pool,
                  const int64_t *tables, int64_t width, int64_t bs, int64_t B, int64_t H, int64_t K, int64_t D,
                  const int64_t *lens, float scale, float *out) {
    #pragma omp parallel
    {
        float *s = (float *)malloc(sizeof(float) * (size_t)(width * bs));
        attend_paged_rows(q, q_row_stride, k_pool, v_pool, tables, width, bs, B, H, K, D, lens, scale, out, s);
        free(s);
    }
}

/* ---- the small ops of a decode layer -------------------------------------------------------------
   Each of these is a handful of PyTorch ops (and their per-call overhead, ~2-10 us each) in the
   reference code of transformer.py; one call here does the same arithmetic in one pass. */

/* out[n] = x[n] / sqrt(mean(x[n]^2) + eps) * w, for N rows of C. */
void rms_norm(const float *x, int64_t N, int64_t C, const float *w, float eps, float *out) {
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * C;
        float *on = out + n * C;
        double ss = 0.0;
        for (int64_t c = 0; c < C; c++) ss += (double)xn[c] * xn[c];
        float r = 1.0f / sqrtf((float)(ss / C) + eps);
        for (int64_t c = 0; c < C; c++) on[c] = xn[c] * r * w[c];
    }
}

/* gu [N, 2F] = (gate | up) -> out [N, F] = silu(gate) * up, silu(g) = g / (1 + e^-g). */
void silu_mul(const float *gu, int64_t N, int64_t F, float *out) {
    for (int64_t n = 0; n < N; n++) {
        const float *g = gu + n * 2 * F, *u = g + F;
        float *o = out + n * F;
        int64_t f = 0;
#ifdef __AVX512F__
        for (; f + 16 <= F; f += 16) {
            __m512 x = _mm512_loadu_ps(g + f);
            /* t = e^-|x| <= 1; silu = x / (1 + t) for x >= 0, x t / (1 + t) for x < 0 */
            __m512 t = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
            __m512 num = _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), x, t);
            __m512 s = _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), t));
            _mm512_storeu_ps(o + f, _mm512_mul_ps(s, _mm512_loadu_ps(u + f)));
        }
#endif
        for (; f < F; f++) o[f] = g[f] / (1.0f + expf(-g[f])) * u[f];
    }
}

/* One new token per row, straight from the fused projection qkv [B, (H + 2K) D]: rotate the queries
   (-> q_out [B, H, D]) and the keys by RoPE (x cos + roll(x, D/2) signed_sin, tables [B, D] at each
   row's position), and write keys and values into the cache at [slot0 + b, kv, pos[b]] (nothing for a
   position outside [0, max_pos)). */
void rope_store(const float *qkv, int64_t B, int64_t H, int64_t K, int64_t D, const float *cos_,
                const float *sin_, float *q_out, float *k_cache, float *v_cache, int64_t slot0, int64_t max_pos,
                const int64_t *pos) {
    int64_t half = D / 2, width = (H + 2 * K) * D;
    for (int64_t b = 0; b < B; b++) {
        const float *row = qkv + b * width, *c = cos_ + b * D, *s = sin_ + b * D;
        int store = pos[b] >= 0 && pos[b] < max_pos;
        for (int64_t h = 0; h < (store ? H + K : H); h++) {
            const float *x = row + h * D;
            float *dst = h < H ? q_out + (b * H + h) * D
                               : k_cache + (((slot0 + b) * K + (h - H)) * max_pos + pos[b]) * D;
            for (int64_t d = 0; d < D; d++) dst[d] = x[d] * c[d] + x[(d + half) % D] * s[d];
        }
        for (int64_t kv = 0; kv < (store ? K : 0); kv++) {
            const float *x = row + (H + K + kv) * D;
            float *dst = v_cache + (((slot0 + b) * K + kv) * max_pos + pos[b]) * D;
            for (int64_t d = 0; d < D; d++) dst[d] = x[d];
        }
    }
}

/* rope_store into a paged cache: row b's key and value go to block blocks[b], offset offs[b] of the pools
   [blocks, K, bs, D] (blocks[b] < 0: nothing is stored). */
void rope_store_paged(const float *qkv, int64_t B, int64_t H, int64_t K, int64_t D, const float *cos_,
                      const float *sin_, float *q_out, float *k_pool, float *v_pool, int64_t bs,
                      const int64_t *blocks, const int64_t *offs) {
    int64_t half = D / 2, width = (H + 2 * K) * D;
    for (int64_t b = 0; b < B; b++) {
        const float *row = qkv + b * width, *c = cos_ + b * D, *s = sin_ + b * D;
        int store = blocks[b] >= 0;
        for (int64_t h = 0; h < (store ? H + K : H); h++) {
            const float *x = row + h * D;
            float *dst = h < H ? q_out + (b * H + h) * D
                               : k_pool + ((blocks[b] * K + (h - H)) * bs + offs[b]) * D;
            for (int64_t d = 0; d < D; d++) dst[d] = x[d] * c[d] + x[(d + half) % D] * s[d];
        }
        for (int64_t kv = 0; kv < (store ? K : 0); kv++) {
            const float *x = row + (H + K + kv) * D;
            float *dst = v_pool + ((blocks[b] * K + kv) * bs + offs[b]) * D;
            for (int64_t d = 0; d < D; d++) dst[d] = x[d];
        }
    }
}

/* ---- sampling: the k largest logits of each row ---------------------------------------------------
   torch.topk spends ~120 us on one 49,152-entry row on this CPU whatever k is, and a sampled token
   needs one or two of them (top-k's candidates, top-p's sorted prefix). Here one streaming pass keeps a
   threshold, the k-th best value known so far, and appends only the entries above it to a buffer, testing
   16 entries at a time; when the buffer is full, a selection cuts it back to the k best and raises the
   threshold. A row costs one pass plus ~k log(V/k) appends and a few selections of ~4k entries.
   Ties go to the lower id (entries arrive in id order and only a strictly greater value enters), and the
   result is sorted by value, descending, ties by id, ascending: a total order, so it is deterministic.
   The caller guarantees no NaN and 0 < k <= V. */

typedef struct { float v; int64_t i; } cand_t;

static inline int better(cand_t a, cand_t b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

/* Reorder c[0..n) so that its k best come first (in any order). */
static void select_best(cand_t *c, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;  /* median of three as the pivot, moved to hi */
        if (better(c[mid], c[lo])) { cand_t t = c[mid]; c[mid] = c[lo]; c[lo] = t; }
        if (better(c[hi], c[lo])) { cand_t t = c[hi]; c[hi] = c[lo]; c[lo] = t; }
        if (better(c[mid], c[hi])) { cand_t t = c[mid]; c[mid] = c[hi]; c[hi] = t; }
        cand_t pivot = c[hi];
        int64_t store = lo;
        for (int64_t j = lo; j < hi; j++)
            if (better(c[j], pivot)) { cand_t t = c[j]; c[j] = c[store]; c[store] = t; store++; }
        cand_t t = c[store]; c[store] = c[hi]; c[hi] = t;  /* the pivot at its rank */
        if (store == k - 1 || store == k) return;
        if (store < k) lo = store + 1; else hi = store - 1;
    }
}

static int by_rank(const void *a, const void *b) {
    return better(*(const cand_t *)a, *(const cand_t *)b) ? -1 : 1;  /* ids are unique: never equal */
}

/* Cut buf[0..n) back to its k best; returns the new threshold, the worst value kept. */
static float cut(cand_t *buf, int64_t n, int64_t k) {
    select_best(buf, n, k);
    float thr = buf[0].v;
    for (int64_t r = 1; r < k; r++) thr = buf[r].v < thr ? buf[r].v : thr;
    return thr;
}

/* The k best entries of x[0..V) into buf[0..k), sorted (buf holds TOPK_CAP(k) candidates). */
#define TOPK_CAP(k) (4 * (k) + 64)
static void topk_row(const float *x, int64_t V, int64_t k, cand_t *buf) {
    const int64_t cap = TOPK_CAP(k);
    int64_t n = 0;
    for (; n < k; n++) buf[n] = (cand_t){x[n], n};
    float thr = x[0];
    for (int64_t j = 1; j < k; j++) thr = x[j] < thr ? x[j] : thr;  /* the k-th best of the first k */
    int64_t i = k;
#ifdef __AVX512F__
    for (; i + 16 <= V; i += 16) {
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), _mm512_set1_ps(thr), _CMP_GT_OQ);
        while (m) {
            int j = __builtin_ctz(m);
            m &= m - 1;
            buf[n++] = (cand_t){x[i + j], i + j};
            if (n == cap) { thr = cut(buf, n, k); n = k; }  /* the worst kept is the new threshold */
        }
    }
#endif
    for (; i < V; i++) {
        if (!(x[i] > thr)) continue;
        buf[n++] = (cand_t){x[i], i};
        if (n == cap) { thr = cut(buf, n, k); n = k; }
    }
    select_best(buf, n, k);
    qsort(buf, k, sizeof(cand_t), by_rank);
}

/* Returns 0, or -1 if a row's candidate buffer (~20 KB for k = 256) could not be had. */
int topk_rows(const float *x, int64_t B, int64_t V, int64_t k, float *vals, int64_t *ids) {
    int failed = 0;
#pragma omp parallel for if (B > 1) reduction(| : failed)
    for (int64_t b = 0; b < B; b++) {
        cand_t *buf = malloc(TOPK_CAP(k) * sizeof(cand_t));
        if (!buf) { failed = 1; continue; }
        topk_row(x + b * V, V, k, buf);
        for (int64_t r = 0; r < k; r++) { vals[b * k + r] = buf[r].v; ids[b * k + r] = buf[r].i; }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* ---- sampling: temperature, top-p and the draw of one row, fused ----------------------------------
   The common request (temperature, top-p, nothing else) as the sampling pipeline defines it
   (sampling/sampler.py), for one row, in a few passes over the logits instead of some twenty tensor ops:

     raw log-probabilities: x - logsumexp(x); x' = (x - max x) / T (T = 1: x itself);
     p = softmax(x'); top-p: sort p descending, the crossing p_c where the float64 cumulative mass first
     reaches top_p, keep p_i >= p_c (ties with the crossing token kept); top_p = 1 keeps every token;
     draw: the first kept token, in token-id order, whose float64 cumulative mass exceeds u * total.

   The sorted prefix comes from topk_row (256 candidates, then 4096, then the whole row), exactly the sort's
   order. Returns per row: the token, its raw and processed log-probability, and failed = 1 (token 0,
   -inf) when no logit is finite. A row with a +inf or NaN logit returns status 1: the caller takes the
   tensor pipeline, which gives +inf its own meaning and reads NaN as -inf. Deterministic per row. */

static int cand_by_id(const void *a, const void *b) {
    int64_t x = ((const cand_t *)a)->i, y = ((const cand_t *)b)->i;
    return x < y ? -1 : x > y;
}

static int sample_row(const float *x, int64_t V, float T, double top_p, double u, int64_t *token, float *raw_lp,
                      float *proc_lp, uint8_t *failed, float *scratch) {
    cand_t *buf = NULL;  /* top-p's candidates, sized for the prefix tried */
    float m = -INFINITY;
    for (int64_t i = 0; i < V; i++) {
        float v = x[i];
        if (v == INFINITY || v != v) return 1;  /* +inf or NaN: the pipeline's own rules for them */
        if (v > m) m = v;
    }
    *failed = 0;
    if (m == -INFINITY) {
        *token = 0; *raw_lp = -INFINITY; *proc_lp = -INFINITY; *failed = 1;
        return 0;
    }
    /* p_i = e_i / Z over x' = (x - m) / T (the maximum of x' is 0); -inf -> weight 0. The raw
       distribution's normaliser Zraw = sum e^(x - m) comes from the same pass. */
    const float inv = 1.0f / T;
    double Z = 0.0, Zraw = 0.0;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 z = _mm512_setzero_ps(), zr = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m), iv = _mm512_set1_ps(inv), ninf = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= V; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __mmask16 ok = _mm512_cmp_ps_mask(v, ninf, _CMP_GT_OQ);
        __m512 a = _mm512_sub_ps(v, mv);
        __m512 e = _mm512_maskz_mov_ps(ok, exp_nonpos(T == 1.0f ? a : _mm512_mul_ps(a, iv)));
        _mm512_storeu_ps(scratch + i, e);
        z = _mm512_add_ps(z, e);
        if (T != 1.0f) zr = _mm512_add_ps(zr, _mm512_maskz_mov_ps(ok, exp_nonpos(a)));
    }
    Z = _mm512_reduce_add_ps(z);
    Zraw = _mm512_reduce_add_ps(zr);
#endif
    for (; i < V; i++) {
        float v = x[i];
        if (!(v > -INFINITY)) { scratch[i] = 0.0f; continue; }
        float e = expf((v - m) * inv);
        scratch[i] = e;
        Z += e;
        if (T != 1.0f) Zraw += expf(v - m);
    }
    if (T == 1.0f) Zraw = Z;
    const float lse_raw = m + (float)log(Zraw);
    double total = 0.0;
    int64_t chosen = -1;
    if (top_p >= 1.0) {  /* every token: the draw straight over the row, in id order */
        for (int64_t i = 0; i < V; i++) total += scratch[i];
        double target = u * total, cum = 0.0;
        int64_t last = 0;
        for (int64_t i = 0; i < V; i++) {
            if (scratch[i] <= 0.0f) continue;
            last = i;
            cum += scratch[i];
            if (cum > target) { chosen = i; break; }
        }
        if (chosen < 0) chosen = last;  /* u * total rounded up: the last token with mass */
    } else {
        /* the sorted prefix that holds top_p of the mass: 256 candidates, then 4096, then all */
        const double need = top_p * Z;
        int64_t K = V < 256 ? V : 256, n_keep = 0;
        for (;;) {
            cand_t *grown = realloc(buf, sizeof(cand_t) * (size_t)(K == V ? V : TOPK_CAP(K)));
            if (!grown) { free(buf); return 2; }
            buf = grown;
            if (K == V) {
                for (int64_t i = 0; i < V; i++) buf[i] = (cand_t){x[i], i};  /* no NaN here (checked above) */
                qsort(buf, V, sizeof(cand_t), by_rank);
            } else {
                topk_row(x, V, K, buf);
            }
            double cum = 0.0;
            int64_t cross = -1;
            for (int64_t r = 0; r < K; r++) {
                cum += scratch[buf[r].i];
                if (cum >= need) { cross = r; break; }
            }
            if (cross >= 0) {
                const float pc = scratch[buf[cross].i];
                n_keep = cross + 1;
                while (n_keep < K && scratch[buf[n_keep].i] >= pc) n_keep++;
                if (n_keep < K || K == V) break;  /* else tied tokens may lie beyond the prefix */
            } else if (K == V) {  /* rounding left the mass short of top_p * Z: keep every token with mass */
                n_keep = V;
                while (n_keep > 1 && scratch[buf[n_keep - 1].i] <= 0.0f) n_keep--;
                break;
            }
            K = K < 4096 && V > 4096 ? 4096 : V;
        }
        qsort(buf, n_keep, sizeof(cand_t), cand_by_id);  /* the kept tokens in id order */
        for (int64_t r = 0; r < n_keep; r++) total += scratch[buf[r].i];
        double target = u * total, cum = 0.0;
        for (int64_t r = 0; r < n_keep; r++) {
            cum += scratch[buf[r].i];
            if (cum > target) { chosen = buf[r].i; break; }
        }
        if (chosen < 0) chosen = buf[n_keep - 1].i;
        free(buf);
    }
    *token = chosen;
    *raw_lp = x[chosen] - lse_raw;
    *proc_lp = (float)log((double)scratch[chosen] / total);
    return 0;
}

int sample_top_p_rows(const float *x, int64_t B, int64_t V, const float *T, const double *top_p, const double *u,
                      int64_t *tokens, float *raw_lp, float *proc_lp, uint8_t *failed) {
    int status = 0;
#pragma omp parallel for if (B > 1) reduction(| : status)
    for (int64_t b = 0; b < B; b++) {
        float *weights = malloc(sizeof(float) * (size_t)V);  /* the row's temperature-scaled weights */
        if (!weights) { status |= 2; continue; }
        status |= sample_row(x + b * V, V, T[b], top_p[b], u[b], tokens + b, raw_lp + b, proc_lp + b, failed + b,
                             weights);
        free(weights);
    }
    return status;
}
