/* Matrix products computed directly on GGUF quantized blocks (built with kernels.c by native.py; the
   format and its reasons are in qblocks.py).

   ---- the weights ----------------------------------------------------------------------------------

   Every supported GGUF type is repacked at load into one form: W[o][i] = d[o][g] * code + m[o][g] with
   an unsigned code (4 or 8 bits) and one (d, m) pair per group of 32 or 16 elements (g = i / group),
   d and m float16 or float32. 4-bit rows are 64-element chunks of 32 bytes: byte j holds element j in
   its low nibble and element 32 + j in its high one, so one 32-byte load, shifted and masked, gives 64
   codes in their natural order (a trailing 32 elements keep ggml's own order: low nibble element j,
   high element 16 + j).

   ---- the activations ------------------------------------------------------------------------------

   Each row of x is quantized per block of 32, as llama.cpp does: xd = max|x| / 127, xq = round(x / xd)
   (int8), and per group of 16, xs = xd * sum(xq). Then

       y[o] = sum_g d[g] xd[g] (sum_{i in g} code_i xq_i) + sum_g m[g] (sum of xs over g)

   which is W x~ exactly for x~ = xd * xq: the integer dot products are exact (u8 x s8 with VNNI's
   vpdpbusd) and only the activations are rounded.

   With two levels (``--activations int8x2``) qb_quantize also rounds each block's error x - xd * xq the
   same way, into the next row of x; the kernels add an output's two rows of products before they store
   it (rows of x go in passes of 16, so a pair is never split). x~ is then x to about 16 bits for twice
   the dot products: greedy text equal to float32's (BENCHMARKS.md, ``logitlab bench --fidelity``).

   ---- why it is shaped this way --------------------------------------------------------------------

   Decode reads every weight once per token: it is bound by memory bandwidth, and 4-bit blocks move an
   eighth of float32's bytes. The AVX-512 loop keeps the integer work per 64 codes to a load, a shift and
   a mask (shared by every row of x) and, per row, one vpdpbusd. Its 16 int32 lanes each hold a quarter
   of a group's dot product (8 or 4 lanes per group), so the group scales are applied per lane: the lane
   sums are converted to float and multiplied-added with a vector of d * xd laid out lane by lane (one
   permute of the 16 groups' scales), which is cheaper than a horizontal sum per group. Each weight row is
   read once for up to 16 rows of x, which stay in L1.

   qb_matmul_rows is an orphaned `omp for` (no parallel region of its own): the fused decode step
   (step.c) calls it from inside its one parallel region, every thread of it, and the output rows are
   split between them; outside a region it runs serially. Like any worksharing loop it ends in a barrier.

   Three code paths: AVX-512 VNNI (Zen 4, Ice Lake and later), AVX2 (also AVX-512 without VNNI;
   vpmaddubsw, whose int16 pair sums would saturate for 8-bit codes above 127: those are split into
   their low 7 bits and their top bit), and plain C. tests/test_qblocks.py builds each and checks it against the float64 reference. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QB_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define QB_AVX2 1
#endif

#define QB_TILE 16 /* rows of x per pass over a weight row (more rows: one pass per 16) */
#define QB_TILE_BLOCK 16 /* rows of x a tile's accumulators hold in registers at once */
#define QB_TILE_ROWS 1 /* rows of x from which a tiled copy, where there is one, is used: all (measured
                          faster from one row in the whole decode step, 1.09x, and 1.8x at 32 rows) */
/* Each weight row asks for the codes 4 KB ahead of it: left to the hardware prefetcher alone, a one-row
   product from DRAM reached 55-65% of a plain read's bandwidth, with this 80-90% (measured, 1 and 2
   threads). Prefetching the scales too (an eighth to a quarter of the bytes) measured no better. */
#define QB_PREFETCH 4096

#include "qblocks.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

static ALWAYS_INLINE float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (e == 0) { /* zero or subnormal: man * 2^-24, exact in float32 */
        float f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    bits = e == 0x1F ? sign | 0x7F800000u | (man << 13) : sign | ((e + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static ALWAYS_INLINE float scale_at(const void *p, int64_t i, int f32) {
    return f32 ? ((const float *)p)[i] : half_to_float(((const uint16_t *)p)[i]);
}

/* Element i's code of a weight row (the scalar paths; the vector loops unpack whole chunks). */
static ALWAYS_INLINE int code_at(const uint8_t *c, int bits, int64_t in, int64_t i) {
    if (bits == 8) return c[i];
    int64_t full = in / 64 * 64;
    if (i < full) return (c[i / 64 * 32 + i % 32] >> (i % 64 / 32 * 4)) & 15;
    int64_t j = i - full; /* the trailing 32: ggml's order */
    return (c[full / 2 + j % 16] >> (j / 16 * 4)) & 15;
}

/* ---- activations ---------------------------------------------------------------------------------- */

/* round half to even for |v| < 2^22 (the default rounding mode does it: adding 1.5 * 2^23 leaves no
   fraction bits), the same rounding as torch.round and the vector path's roundscale */
static ALWAYS_INLINE float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

/* One block of 32 values: q = round(v / d) with d = max|v| / 127 (*dp), and s[h] = d * sum(q) over each
   half of 16. */
static ALWAYS_INLINE void quantize_block(const float *v, int8_t *q, float *dp, float *s) {
#ifdef QB_AVX512
    __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float d = amax / 127.0f;
    *dp = d;
    if (d == 0.0f) {
        memset(q, 0, 32);
        s[0] = s[1] = 0.0f;
        return;
    }
    __m512 vd = _mm512_set1_ps(d), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    __m512i q0 = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_roundscale_ps(
        _mm512_div_ps(v0, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))));
    __m512i q1 = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_roundscale_ps(
        _mm512_div_ps(v1, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
    s[0] = d * (float)_mm512_reduce_add_epi32(q0);
    s[1] = d * (float)_mm512_reduce_add_epi32(q1);
#else
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) {
        float a = v[i] < 0 ? -v[i] : v[i];
        amax = a > amax ? a : amax;
    }
    float d = amax / 127.0f;
    *dp = d;
    for (int h = 0; h < 2; h++) {
        int sum = 0;
        for (int i = 16 * h; i < 16 * h + 16; i++) {
            float t = d == 0.0f ? 0.0f : round_even(v[i] / d);
            t = t > 127.0f ? 127.0f : t < -127.0f ? -127.0f : t;
            q[i] = (int8_t)t;
            sum += q[i];
        }
        s[h] = d * (float)sum;
    }
#endif
}

/* R rows of x [R, in] -> levels * R rows of (xq [in], xd [in / 32], xs [in / 16]): row r's level j is row
   levels * r + j. Level 0 is x rounded as above; level 1 (levels == 2) is its rounding error
   e = x - xd * xq (one rounding: an FMA) rounded the same way, so x ~= xd0 * xq0 + xd1 * xq1 to about
   16 bits (a block's error is at most max|x| / (127 * 254)) at twice the integer work. */
void qb_quantize(const float *x, int64_t R, int64_t in, int levels, int8_t *xq, float *xd, float *xs) {
    const int64_t nb = in / 32;
    for (int64_t r = 0; r < R; r++) {
        const int64_t row = r * levels;
        for (int64_t b = 0; b < nb; b++) {
            const float *v = x + r * in + b * 32;
            int8_t *q = xq + row * in + b * 32;
            float *d = xd + row * nb + b, *s = xs + row * 2 * nb + 2 * b;
            quantize_block(v, q, d, s);
            if (levels == 2) {
                float e[32];
                for (int i = 0; i < 32; i++) e[i] = fmaf(-d[0], (float)q[i], v[i]);
                quantize_block(e, q + in, d + nb, s + 2 * nb);
            }
        }
    }
}

/* ---- one weight row against R rows of x: res[r] = W[o] . x~[r] ------------------------------------
   c, d, m: the weight row's codes and scales; xq, xd, xs: row 0 of x (rows in, in/32, in/16 apart).
   BITS, GROUP and R are constants at every call (see ROWS below), so the loops over R unroll. */

#ifdef QB_AVX512
static ALWAYS_INLINE __m512 load_scales16(const void *p, int64_t i, __mmask16 k, int f32) {
    if (f32) return _mm512_maskz_loadu_ps(k, (const float *)p + i);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)p + i));
}

static ALWAYS_INLINE void row_dot(const int BITS, const int GROUP, const int R, const uint8_t *c, const void *d,
                                  const void *m, int f32, int64_t in, const int8_t *xq, const float *xd,
                                  const float *xs, float *res) {
    const int64_t ng = in / GROUP, nxb = in / 32, nxs = in / 16;
    const int gpc = 64 / GROUP;        /* groups per 64-code chunk (one vpdpbusd): 2 or 4 */
    const int bpg = BITS * GROUP / 8;  /* code bytes per group */
    const __m512i nib = _mm512_set1_epi8(0x0F);
    /* a 32-byte chunk broadcast to both halves: low nibbles (elements 0-31) stay, high ones (32-63) shift */
    const __m512i shift_full = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    /* the trailing 16 bytes broadcast to four 128-bit lanes: elements 0-15, 16-31 (lanes 2-3 meet zeros) */
    const __m512i shift_half = _mm512_set_epi64(0, 0, 0, 0, 4, 4, 0, 0);
    /* which of the chunk's groups each int32 lane belongs to */
    const __m512i lane_group = GROUP == 32 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                           : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i pairs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    __m512 acc[QB_TILE], sv[QB_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < ng; g0 += 16) { /* 16 groups: one vector of scales */
        const int nb = ng - g0 < 16 ? (int)(ng - g0) : 16;
        const __mmask16 km = (__mmask16)((1u << nb) - 1);
        const __m512 D = load_scales16(d, g0, km, f32), M = load_scales16(m, g0, km, f32);
        for (int r = 0; r < R; r++) {
            if (GROUP == 32) { /* m * (xs[2g] + xs[2g + 1]); lane-wise d * xd */
                const float *s = xs + r * nxs + 2 * g0;
                __mmask16 klo = nb >= 8 ? 0xFFFF : (__mmask16)((1u << 2 * nb) - 1);
                __mmask16 khi = nb > 8 ? (__mmask16)((1u << (2 * nb - 16)) - 1) : 0;
                __m512 a = _mm512_maskz_loadu_ps(klo, s), b = _mm512_maskz_loadu_ps(khi, s + 16);
                __m512 sum = _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
                acc[r] = _mm512_fmadd_ps(M, sum, acc[r]);
                sv[r] = _mm512_mul_ps(D, _mm512_maskz_loadu_ps(km, xd + r * nxb + g0));
            } else { /* group 16: xs is per group already; xd (per 32) serves two groups */
                acc[r] = _mm512_fmadd_ps(M, _mm512_maskz_loadu_ps(km, xs + r * nxs + g0), acc[r]);
                __m256 x8 = _mm256_maskz_loadu_ps((__mmask8)((1u << (nb + 1) / 2) - 1), xd + r * nxb + g0 / 2);
                sv[r] = _mm512_mul_ps(D, _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(x8)));
            }
        }
        const uint8_t *cb = c + g0 * bpg;
        const int8_t *xb = xq + g0 * GROUP;
        __m512i idx = lane_group;
        int k = 0;
        for (; (k + 1) * gpc <= nb; k++) { /* whole chunks of 64 codes */
            __m512i w = BITS == 4 ? _mm512_and_si512(_mm512_srlv_epi64(_mm512_broadcast_i64x4(
                                        _mm256_loadu_si256((const __m256i *)(cb + 32 * k))), shift_full), nib)
                                  : _mm512_loadu_si512((const void *)(cb + 64 * k));
            for (int r = 0; r < R; r++) {
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                                _mm512_loadu_si512((const void *)(xb + r * in + 64 * k)));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, sv[r]), acc[r]);
            }
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(gpc));
        }
        if (k * gpc < nb) { /* 32 codes left (in % 64 == 32): the upper 32 activation bytes are zero */
            __m512i w = BITS == 4 ? _mm512_and_si512(_mm512_srlv_epi64(_mm512_broadcast_i32x4(
                                        _mm_loadu_si128((const __m128i *)(cb + 32 * k))), shift_half), nib)
                                  : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(cb + 64 * k)));
            for (int r = 0; r < R; r++) {
                __m512i x = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(xb + r * in + 64 * k)));
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, sv[r]), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) res[r] = _mm512_reduce_add_ps(acc[r]);
}

#elif defined(QB_AVX2)
/* 32 codes (one group of 32, or two of 16) at a time; codes >= 128 (8-bit) are split so that
   vpmaddubsw's int16 pair sums cannot saturate: code = (code & 127) + 128 * (code >> 7). */
static ALWAYS_INLINE __m256i dot32(const int BITS, __m256i w, __m256i x) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (BITS == 4) return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
    __m256i lo = _mm256_and_si256(w, _mm256_set1_epi8(0x7F));
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 7), _mm256_set1_epi8(1));
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, x), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x), _mm256_set1_epi16(128)));
}

static ALWAYS_INLINE void row_dot(const int BITS, const int GROUP, const int R, const uint8_t *c, const void *d,
                                  const void *m, int f32, int64_t in, const int8_t *xq, const float *xd,
                                  const float *xs, float *res) {
    const int64_t nu = in / 32, nxs = in / 16, full = in / 64;
    const __m256i nib = _mm256_set1_epi8(0x0F);
    __m256 acc[QB_TILE];
    float macc[QB_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), macc[r] = 0.0f;
    for (int64_t u = 0; u < nu; u++) { /* 32 elements */
        __m256i w;
        if (BITS == 8) {
            w = _mm256_loadu_si256((const __m256i *)(c + 32 * u));
        } else if (u / 2 < full) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(c + 32 * (u / 2)));
            w = _mm256_and_si256(u % 2 ? _mm256_srli_epi16(b, 4) : b, nib);
        } else {
            __m128i b = _mm_loadu_si128((const __m128i *)(c + 32 * full));
            w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), nib);
        }
        float d0, d1;
        if (GROUP == 32) {
            d0 = d1 = scale_at(d, u, f32);
            float mu = scale_at(m, u, f32);
            for (int r = 0; r < R; r++) macc[r] += mu * (xs[r * nxs + 2 * u] + xs[r * nxs + 2 * u + 1]);
        } else {
            d0 = scale_at(d, 2 * u, f32), d1 = scale_at(d, 2 * u + 1, f32);
            float m0 = scale_at(m, 2 * u, f32), m1 = scale_at(m, 2 * u + 1, f32);
            for (int r = 0; r < R; r++) macc[r] += m0 * xs[r * nxs + 2 * u] + m1 * xs[r * nxs + 2 * u + 1];
        }
        for (int r = 0; r < R; r++) {
            float x = xd[r * (in / 32) + u];
            __m256 s = _mm256_set_m128(_mm_set1_ps(d1 * x), _mm_set1_ps(d0 * x));
            __m256i p = dot32(BITS, w, _mm256_loadu_si256((const __m256i *)(xq + r * in + 32 * u)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        res[r] = _mm_cvtss_f32(s) + macc[r];
    }
}

#else
static ALWAYS_INLINE void row_dot(const int BITS, const int GROUP, const int R, const uint8_t *c, const void *d,
                                  const void *m, int f32, int64_t in, const int8_t *xq, const float *xd,
                                  const float *xs, float *res) {
    const int64_t ng = in / GROUP, nxs = in / 16;
    for (int r = 0; r < R; r++) res[r] = 0.0f;
    for (int64_t g = 0; g < ng; g++) {
        float dg = scale_at(d, g, f32), mg = scale_at(m, g, f32);
        int codes[32];
        for (int i = 0; i < GROUP; i++) codes[i] = code_at(c, BITS, in, g * GROUP + i);
        for (int r = 0; r < R; r++) {
            const int8_t *x = xq + r * in + g * GROUP;
            int32_t s = 0;
            for (int i = 0; i < GROUP; i++) s += codes[i] * x[i];
            const float *xsr = xs + r * nxs + g * GROUP / 16;
            float xsum = GROUP == 32 ? xsr[0] + xsr[1] : xsr[0];
            res[r] += dg * xd[r * (in / 32) + g * GROUP / 32] * (float)s + mg * xsum;
        }
    }
}
#endif

/* The output rows split between the threads of the caller's parallel region (or all here, serially). */
static ALWAYS_INLINE void rows_body(const int BITS, const int GROUP, const int R, const qb_mat *w,
                                    const int8_t *xq, const float *xd, const float *xs, float *y, int64_t ys,
                                    int accumulate, int levels) {
    const int64_t in = w->in, ng = in / GROUP, row_bytes = in * BITS / 8;
    const int f32 = w->scale_f32;
    const char *d = (const char *)w->d, *m = (const char *)w->m;
    const int64_t sbytes = ng * (f32 ? 4 : 2);
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < w->out; o++) {
        float res[QB_TILE];
        const char *ahead = (const char *)(w->codes + o * row_bytes) + QB_PREFETCH;
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(ahead + b, 0, 3);
        row_dot(BITS, GROUP, R, w->codes + o * row_bytes, d + o * sbytes, m + o * sbytes, f32, in, xq, xd, xs, res);
        for (int r = 0; r < R; r += levels) {  /* an output row: the sum of its x rows' levels */
            float v = levels == 2 ? res[r] + res[r + 1] : res[r], *yo = y + r / levels * ys + o;
            *yo = accumulate ? *yo + v : v;
        }
    }
}

#define ROWS(B, G, R)                                                                                        \
    static void rows_##B##_##G##_##R(const qb_mat *w, const int8_t *xq, const float *xd, const float *xs,    \
                                     float *y, int64_t ys, int acc, int lv) {                                \
        rows_body(B, G, R, w, xq, xd, xs, y, ys, acc, lv);                                                   \
    }
#define ROWS_ALL(B, G)                                                                                       \
    ROWS(B, G, 1) ROWS(B, G, 2) ROWS(B, G, 3) ROWS(B, G, 4) ROWS(B, G, 5) ROWS(B, G, 6) ROWS(B, G, 7)         \
    ROWS(B, G, 8) ROWS(B, G, 9) ROWS(B, G, 10) ROWS(B, G, 11) ROWS(B, G, 12) ROWS(B, G, 13) ROWS(B, G, 14)   \
    ROWS(B, G, 15) ROWS(B, G, 16)                                                                            \
    typedef void (*rows_fn_##B##_##G)(const qb_mat *, const int8_t *, const float *, const float *, float *, \
                                      int64_t, int, int);                                                    \
    static const rows_fn_##B##_##G rows_##B##_##G[QB_TILE] = {                                               \
        rows_##B##_##G##_1, rows_##B##_##G##_2, rows_##B##_##G##_3, rows_##B##_##G##_4,                      \
        rows_##B##_##G##_5, rows_##B##_##G##_6, rows_##B##_##G##_7, rows_##B##_##G##_8,                      \
        rows_##B##_##G##_9, rows_##B##_##G##_10, rows_##B##_##G##_11, rows_##B##_##G##_12,                   \
        rows_##B##_##G##_13, rows_##B##_##G##_14, rows_##B##_##G##_15, rows_##B##_##G##_16};
ROWS_ALL(4, 32)
ROWS_ALL(8, 32)
ROWS_ALL(8, 16)

/* ---- tiles: 16 output rows to a vector, for batches of rows ------------------------------------------

   Beyond a few rows of x the kernel above is compute-bound: per 64 codes and row of x it spends a
   vpdpbusd, a conversion, a scale permute and an FMA, because its int32 lanes hold parts of one output's
   groups. The tiled copy of a matrix (made by qb_tile, only where this kernel is compiled) turns that
   around: lane j of a vector belongs to output row 16t + j, and a vector holds four consecutive codes of
   each of 16 output rows. A group of 32 codes is then eight vpdpbusd per row of x (each with four
   activation bytes broadcast), all into one int32 accumulator, and one conversion, one multiply and two
   FMAs apply the 16 rows' scales at once: about 0.7 vector instructions per output, 32 codes and row of
   x instead of 2.3. The codes are unpacked once per tile and reused for every row of x.

   Layout: a "unit" is 32 bytes of a weight row (64 four-bit codes in the chunk order above, or 32 eight-bit
   codes); tile_codes[((t * units + u) * 8 + k) * 64 + 4 * j + b] = codes[16 t + j][32 u + 4 k + b]. The
   scales as float32 [out / 16][groups][16]. Supported: 4-bit codes with in % 64 == 0 and 8-bit codes,
   groups of 32, out % 16 == 0 (qb_tile_ok). */

int qb_tile_ok(const qb_mat *w) {
#ifdef QB_AVX512
    return w->group == 32 && w->out % 16 == 0 && (w->bits == 8 || (w->bits == 4 && w->in % 64 == 0));
#else
    (void)w;
    return 0;
#endif
}

void qb_tile(const qb_mat *w, uint8_t *codes, float *d, float *m) {
    const int64_t row_bytes = w->in * w->bits / 8, units = row_bytes / 32, ng = w->in / 32;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < w->out / 16; t++) {
        for (int64_t u = 0; u < units; u++)
            for (int k = 0; k < 8; k++)
                for (int j = 0; j < 16; j++)
                    memcpy(codes + ((t * units + u) * 8 + k) * 64 + 4 * j,
                           w->codes + (16 * t + j) * row_bytes + 32 * u + 4 * k, 4);
        for (int64_t g = 0; g < ng; g++)
            for (int j = 0; j < 16; j++) {
                d[(t * ng + g) * 16 + j] = scale_at(w->d, (16 * t + j) * ng + g, w->scale_f32);
                m[(t * ng + g) * 16 + j] = scale_at(w->m, (16 * t + j) * ng + g, w->scale_f32);
            }
    }
}

#ifdef QB_AVX512
/* One group of 32 codes (W: 8 vectors, lane j = four codes of output j) against row x's 32 activation
   bytes at xb: the 16 outputs' exact integer dot products. */
static ALWAYS_INLINE __m512i group_dot(const __m512i *W, const int8_t *xb) {
    __m512i p = _mm512_setzero_si512();
    for (int k = 0; k < 8; k++) {
        int32_t x4;
        memcpy(&x4, xb + 4 * k, 4);
        p = _mm512_dpbusd_epi32(p, W[k], _mm512_set1_epi32(x4));
    }
    return p;
}

/* Up to QB_TILE_BLOCK rows of x against one tile (16 output rows): the accumulators and a unit's unpacked
   codes stay in registers (or L1); the tile's codes come from memory for the first block of rows and from
   L1 after it. */
static ALWAYS_INLINE void tile_block(const int BITS, const int R, const uint8_t *tc, const float *td,
                                     const float *tm, int64_t units, int64_t in, const int8_t *xq,
                                     const float *xd, const float *xs, float *y, int64_t ys, int accumulate,
                                     int levels) {
    const int64_t ng = in / 32, nxs = in / 16;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    __m512 acc[QB_TILE_BLOCK];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t u = 0; u < units; u++) {
        __m512i V[8], H[8];
        for (int k = 0; k < 8; k++) V[k] = _mm512_loadu_si512((const void *)(tc + (u * 8 + k) * 64));
        if (BITS == 4)
            for (int k = 0; k < 8; k++) {
                H[k] = _mm512_and_si512(_mm512_srli_epi16(V[k], 4), nib);  /* codes 32-63: the next group */
                V[k] = _mm512_and_si512(V[k], nib);
            }
        const int64_t g = BITS == 4 ? 2 * u : u;  /* the unit's (first) group */
        for (int h = 0; h < (BITS == 4 ? 2 : 1); h++) {
            const __m512 D = _mm512_loadu_ps(td + (g + h) * 16), M = _mm512_loadu_ps(tm + (g + h) * 16);
            for (int r = 0; r < R; r++) {
                __m512i p = group_dot(h ? H : V, xq + r * in + 32 * (g + h));
                const float *s = xs + r * nxs + 2 * (g + h);
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(D, _mm512_set1_ps(xd[r * ng + g + h])),
                                         _mm512_cvtepi32_ps(p), acc[r]);
                acc[r] = _mm512_fmadd_ps(M, _mm512_set1_ps(s[0] + s[1]), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r += levels) {  /* an output row: the sum of its x rows' levels */
        float *yr = y + r / levels * ys;
        __m512 v = levels == 2 ? _mm512_add_ps(acc[r], acc[r + 1]) : acc[r];
        _mm512_storeu_ps(yr, accumulate ? _mm512_add_ps(_mm512_loadu_ps(yr), v) : v);
    }
}

typedef void (*tile_fn)(const uint8_t *, const float *, const float *, int64_t, int64_t, const int8_t *,
                        const float *, const float *, float *, int64_t, int, int);
#define TBLOCK(B, R)                                                                                         \
    static void tile_##B##_##R(const uint8_t *tc, const float *td, const float *tm, int64_t units, int64_t in, \
                               const int8_t *xq, const float *xd, const float *xs, float *y, int64_t ys, int a, \
                               int lv) {                                                                     \
        tile_block(B, R, tc, td, tm, units, in, xq, xd, xs, y, ys, a, lv);                                   \
    }
#define TBLOCK_ALL(B)                                                                                        \
    TBLOCK(B, 1) TBLOCK(B, 2) TBLOCK(B, 3) TBLOCK(B, 4) TBLOCK(B, 5) TBLOCK(B, 6) TBLOCK(B, 7) TBLOCK(B, 8)   \
    TBLOCK(B, 9) TBLOCK(B, 10) TBLOCK(B, 11) TBLOCK(B, 12) TBLOCK(B, 13) TBLOCK(B, 14) TBLOCK(B, 15)          \
    TBLOCK(B, 16)                                                                                            \
    static const tile_fn tiles_##B[QB_TILE_BLOCK] = {                                                        \
        tile_##B##_1, tile_##B##_2, tile_##B##_3, tile_##B##_4, tile_##B##_5, tile_##B##_6, tile_##B##_7,     \
        tile_##B##_8, tile_##B##_9, tile_##B##_10, tile_##B##_11, tile_##B##_12, tile_##B##_13,               \
        tile_##B##_14, tile_##B##_15, tile_##B##_16};
TBLOCK_ALL(4)
TBLOCK_ALL(8)

/* All X rows of x (levels to an output row) against the tiled matrix, the tiles split between the threads
   (an orphaned omp for, as rows_body): each tile's codes are read from memory once, whatever X. */
static void tiles_run(const qb_mat *w, const int8_t *xq, const float *xd, const float *xs, int64_t X, int levels,
                      float *y, int64_t ys, int accumulate) {
    const int64_t in = w->in, units = in * w->bits / 8 / 32, ng = in / 32;
    const tile_fn *fns = w->bits == 4 ? tiles_4 : tiles_8;
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < w->out / 16; t++) {
        const uint8_t *tc = w->tile_codes + t * units * 512;
        const float *td = w->tile_d + t * ng * 16, *tm = w->tile_m + t * ng * 16;
        for (int64_t r0 = 0; r0 < X; r0 += QB_TILE_BLOCK) {  /* an even block: an output's levels stay together */
            int n = X - r0 < QB_TILE_BLOCK ? (int)(X - r0) : QB_TILE_BLOCK;
            fns[n - 1](tc, td, tm, units, in, xq + r0 * in, xd + r0 * ng, xs + r0 * (in / 16),
                       y + r0 / levels * ys + 16 * t, ys, accumulate, levels);
        }
    }
}
#endif

/* Rows of x from which a matrix with a tiled copy uses it. The same kernel for every batch keeps a row's
   result independent of its neighbours; tests and side-by-side benchmarks change it (qb_set_tile_rows). */
static int64_t tile_rows = QB_TILE_ROWS;

void qb_set_tile_rows(int64_t rows) { tile_rows = rows; }

/* Supported: (bits 4, group 32), (bits 8, group 32), (bits 8, group 16), float16 or float32 scales;
   in a multiple of 32 (qblocks.py checks all this). R output rows from levels * R rows of x as qb_quantize
   made them (levels 1 or 2). More than 16 rows of x: one pass per 16. */
void qb_matmul_rows(const qb_mat *w, const int8_t *xq, const float *xd, const float *xs, int64_t R, int levels,
                    float *y, int64_t y_stride, int accumulate) {
    const int64_t in = w->in, X = R * levels;
#ifdef QB_AVX512
    if (w->tile_codes != NULL && X >= tile_rows) {  /* one kernel for every row of this batch */
        tiles_run(w, xq, xd, xs, X, levels, y, y_stride, accumulate);
        return;
    }
#endif
    for (int64_t r0 = 0; r0 < X; r0 += QB_TILE) {  /* QB_TILE is even: an output's levels stay together */
        int n = X - r0 < QB_TILE ? (int)(X - r0) : QB_TILE;
        const int8_t *q = xq + r0 * in;
        const float *dd = xd + r0 * (in / 32), *ss = xs + r0 * (in / 16);
        float *yy = y + r0 / levels * y_stride;
        if (w->bits == 4) rows_4_32[n - 1](w, q, dd, ss, yy, y_stride, accumulate, levels);
        else if (w->group == 32) rows_8_32[n - 1](w, q, dd, ss, yy, y_stride, accumulate, levels);
        else rows_8_16[n - 1](w, q, dd, ss, yy, y_stride, accumulate, levels);
    }
}

/* x [R, in] float32 -> y [R, out]: quantize (to ``levels`` int8 levels), then one parallel region over the
   output rows. */
void qb_matmul(const qb_mat *w, const float *x, int64_t R, int levels, float *y) {
    const int64_t in = w->in, X = R * levels;
    int8_t *xq = malloc((size_t)(X * in) + 64);
    float *xd = malloc(sizeof(float) * (size_t)(X * in / 32) + 64), *xs = malloc(sizeof(float) * (size_t)(X * in / 16) + 64);
    if (xq && xd && xs) {
        qb_quantize(x, R, in, levels, xq, xd, xs);
        #pragma omp parallel
        qb_matmul_rows(w, xq, xd, xs, R, levels, y, w->out, 0);
    }
    free(xq);
    free(xd);
    free(xs);
}

/* ---- dequantization ------------------------------------------------------------------------------- */

/* Row o as float32: d * code + m (the product is exact in float32 for every supported type, so fused or
   not, this is the one rounding of the sum, as in gguf's reference dequantization). */
static void dequant_row(const qb_mat *w, int64_t o, float *out) {
    const int64_t in = w->in, ng = in / w->group, bits = w->bits;
    const uint8_t *c = w->codes + o * (in * bits / 8);
    for (int64_t g = 0; g < ng; g++) {
        float d = scale_at(w->d, o * ng + g, w->scale_f32), m = scale_at(w->m, o * ng + g, w->scale_f32);
        int64_t i0 = g * w->group;
        if (bits == 8) {
            for (int i = 0; i < w->group; i++) out[i0 + i] = d * (float)c[i0 + i] + m;
        } else if (i0 < in / 64 * 64) { /* one half of a whole 64-element chunk */
            const uint8_t *b = c + i0 / 64 * 32;
            int sh = i0 % 64 ? 4 : 0;
            for (int i = 0; i < 32; i++) out[i0 + i] = d * (float)((b[i] >> sh) & 15) + m;
        } else { /* the trailing 32 */
            const uint8_t *b = c + i0 / 2;
            for (int i = 0; i < 16; i++) {
                out[i0 + i] = d * (float)(b[i] & 15) + m;
                out[i0 + 16 + i] = d * (float)(b[i] >> 4) + m;
            }
        }
    }
}

void qb_dequant_rows(const qb_mat *w, const int64_t *ids, int64_t n, float *out) {
    for (int64_t k = 0; k < n; k++) dequant_row(w, ids[k], out + k * w->in);
}

/* float32 -> bfloat16, round to nearest even (NaN stays a quiet NaN), as torch's .to(torch.bfloat16) */
static ALWAYS_INLINE uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

void qb_dequant_bf16(const qb_mat *w, uint16_t *out) {
    #pragma omp parallel
    {
        float *row = malloc(sizeof(float) * (size_t)w->in);
        #pragma omp for schedule(static)
        for (int64_t o = 0; o < w->out; o++) {
            if (!row) continue;
            dequant_row(w, o, row);
            for (int64_t i = 0; i < w->in; i++) out[o * w->in + i] = to_bf16(row[i]);
        }
        free(row);
    }
}
