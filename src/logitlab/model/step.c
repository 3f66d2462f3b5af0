/* One decode step of a Llama-type model as ONE native call (built with kernels.c and qblocks.c by native.py).

   The per-op path (transformer.py) makes about a dozen Python-level kernel calls per layer; at one stream
   of a 135M model those calls and their thread fork/joins are a third of the step. Here a single OpenMP
   parallel region runs every layer: each matmul, attention and small op is an orphaned worksharing loop
   (``*_rows`` in kernels.c and qblocks.c) splitting its work among the same threads, with a barrier
   between dependent stages and no fork or join. The arithmetic is the per-op path's, kernel for kernel,
   so the two agree to float32 rounding; transformer.py stays the reference this is tested against.

   Shapes: R rows (new tokens, one per sequence), C hidden, H/K query/kv heads, D head size, F MLP width,
   V vocabulary. Weights: float32, int8 with per-row scales, or GGUF blocks (qblocks.c), stacked parts
   along the output dimension (q|k|v may be three block matrices of different types). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#include "qblocks.h"

void f32_matmul_rows(const float *x, int64_t rows, int64_t in, const float *w, int64_t out, float *y,
                     int64_t y_stride, int acc);
void q8_matmul_rows(const float *x, int64_t rows, int64_t in, const int8_t *q, const float *scale, int64_t out,
                    float *y, int64_t y_stride, int acc);
void attend_paged_rows(const float *q, int64_t q_row_stride, const float *k_pool, const float *v_pool,
                       const int64_t *tables, int64_t width, int64_t bs, int64_t B, int64_t H, int64_t K,
                       int64_t D, const int64_t *lens, float scale, float *out, float *s);
void rms_norm(const float *x, int64_t N, int64_t C, const float *w, float eps, float *out);
void silu_mul(const float *gu, int64_t N, int64_t F, float *out);
void rope_store_paged(const float *qkv, int64_t B, int64_t H, int64_t K, int64_t D, const float *cos_,
                      const float *sin_, float *q_out, float *k_pool, float *v_pool, int64_t bs,
                      const int64_t *blocks, const int64_t *offs);

enum { ST_F32 = 0, ST_INT8 = 1, ST_BLOCKS = 2 };
#define ST_MAX_PARTS 4

typedef struct {
    int64_t kind, nparts, out, in;
    const void *w;       /* ST_F32: float [out, in]; ST_INT8: int8 [out, in] */
    const float *scale;  /* ST_INT8: [out] */
    qb_mat parts[ST_MAX_PARTS];  /* ST_BLOCKS: stacked along out, in order */
} st_weight;

typedef struct {
    const float *attn_norm, *ffn_norm;
    st_weight qkv, o, gate_up, down;
} st_layer;

typedef struct {
    int64_t n_layers, C, H, K, D, F, V;
    float eps;
    int32_t levels;  /* block weights: int8 levels of the activations (qb_quantize), 1 or 2 */
    int64_t embed_kind;  /* ST_F32 or ST_BLOCKS */
    const float *embed_f32;
    qb_mat embed_q;
    const float *final_norm;
    st_weight head;
    const st_layer *layers;
} st_model;

/* y[R, w.out] (row stride y_stride) = (acc: +=) x @ w^T.  ST_BLOCKS reads x as the activations
   qb_quantize made of it (xq, xd, xs: ``levels`` rows per row of x); the others read x. Called by every
   thread of the region. */
static void matmul(const st_weight *w, const float *x, const int8_t *xq, const float *xd, const float *xs,
                   int levels, int64_t R, float *y, int64_t y_stride, int acc) {
    if (w->kind == ST_F32) {
        f32_matmul_rows(x, R, w->in, (const float *)w->w, w->out, y, y_stride, acc);
    } else if (w->kind == ST_INT8) {
        q8_matmul_rows(x, R, w->in, (const int8_t *)w->w, w->scale, w->out, y, y_stride, acc);
    } else {
        int64_t off = 0;
        for (int64_t p = 0; p < w->nparts; p++) {  /* each part ends in its loop's barrier */
            qb_matmul_rows(&w->parts[p], xq, xd, xs, R, levels, y + off, y_stride, acc);
            off += w->parts[p].out;
        }
    }
}

/* Row r of x [R, n] quantized to ``levels`` rows of (xq, xd, xs): rows levels * r onward. */
static void quantize_row(const float *x, int64_t r, int64_t n, int levels, int8_t *xq, float *xd, float *xs) {
    const int64_t row = r * levels;
    qb_quantize(x + r * n, 1, n, levels, xq + row * n, xd + row * (n / 32), xs + row * (n / 16));
}

/* Row r of x normalised into out (and, levels > 0, quantized to that many levels): one row per iteration. */
static void norm_rows(const float *x, int64_t R, int64_t C, const float *w, float eps, float *out, int levels,
                      int8_t *xq, float *xd, float *xs) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        rms_norm(x + r * C, 1, C, w, eps, out + r * C);
        if (levels) quantize_row(out, r, C, levels, xq, xd, xs);
    }
}

static void quantize_rows(const float *x, int64_t R, int64_t n, int levels, int8_t *xq, float *xd, float *xs) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < R; r++) quantize_row(x, r, n, levels, xq, xd, xs);
}

/* tokens [R]; cos/sin [R, D] (RoPE tables at each row's position); pool [layers, 2, n_blocks, K, bs, D];
   tables [R, width] block ids; write_blocks/write_offsets [R] (where the new key/value go); lens [R] keys
   attended after the write; logits [R, V]. Returns 0, or -1 if scratch memory could not be had. */
int st_decode(const st_model *m, int64_t R, const int64_t *tokens, const float *cos_, const float *sin_,
              float *pool, int64_t n_blocks, int64_t bs, const int64_t *tables, int64_t width,
              const int64_t *write_blocks, const int64_t *write_offsets, const int64_t *lens, float *logits) {
    const int64_t C = m->C, H = m->H, K = m->K, D = m->D, F = m->F, QKV = (H + 2 * K) * D;
    const int64_t widest = F > C ? (F > H * D ? F : H * D) : (C > H * D ? C : H * D);
    const int64_t layer_floats = n_blocks * K * bs * D;  /* one pool (keys or values) of one layer */
    const int lv = m->levels == 2 ? 2 : 1;
    /* every matmul of a model has one kind; the layers' inputs are quantized to in_levels (0: not at all) */
    const int in_levels = m->layers[0].qkv.kind == ST_BLOCKS ? lv : 0;
    const int threads = omp_get_max_threads();
    size_t floats = (size_t)R * (2 * C + QKV + 2 * H * D + 3 * F + lv * (widest / 32 + widest / 16));
    /* the activations of every stage, then each thread's attention scores, then the int8 activations */
    float *buf = (float *)malloc(sizeof(float) * (floats + (size_t)threads * width * bs) + (size_t)(R * lv) * widest);
    if (!buf) return -1;
    float *h = buf, *x = h + R * C, *qkv = x + R * C, *q = qkv + R * QKV, *att = q + R * H * D;
    float *gu = att + R * H * D, *act = gu + R * 2 * F, *xd = act + R * F, *xs = xd + R * lv * (widest / 32);
    float *scores = xs + R * lv * (widest / 16);
    int8_t *xq = (int8_t *)(scores + (size_t)threads * width * bs);
    const float scale = 1.0f / sqrtf((float)D);

    #pragma omp parallel num_threads(threads)
    {
        float *s = scores + (size_t)omp_get_thread_num() * width * bs;
        {
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) {
                if (m->embed_kind == ST_BLOCKS) qb_dequant_rows(&m->embed_q, tokens + r, 1, h + r * C);
                else memcpy(h + r * C, m->embed_f32 + tokens[r] * C, sizeof(float) * C);
            }
            for (int64_t l = 0; l < m->n_layers; l++) {
                const st_layer *L = &m->layers[l];
                float *k_pool = pool + (2 * l) * layer_floats, *v_pool = k_pool + layer_floats;
                norm_rows(h, R, C, L->attn_norm, m->eps, x, in_levels, xq, xd, xs);
                matmul(&L->qkv, x, xq, xd, xs, lv, R, qkv, QKV, 0);
                #pragma omp for schedule(static)
                for (int64_t r = 0; r < R; r++)
                    rope_store_paged(qkv + r * QKV, 1, H, K, D, cos_ + r * D, sin_ + r * D, q + r * H * D, k_pool,
                                     v_pool, bs, write_blocks + r, write_offsets + r);
                attend_paged_rows(q, H * D, k_pool, v_pool, tables, width, bs, R, H, K, D, lens, scale, att, s);
                if (in_levels) quantize_rows(att, R, H * D, lv, xq, xd, xs);
                matmul(&L->o, att, xq, xd, xs, lv, R, h, C, 1);  /* the residual: h += attention */
                norm_rows(h, R, C, L->ffn_norm, m->eps, x, in_levels, xq, xd, xs);
                matmul(&L->gate_up, x, xq, xd, xs, lv, R, gu, 2 * F, 0);
                #pragma omp for schedule(static)
                for (int64_t r = 0; r < R; r++) {
                    silu_mul(gu + r * 2 * F, 1, F, act + r * F);
                    if (in_levels) quantize_row(act, r, F, lv, xq, xd, xs);
                }
                matmul(&L->down, act, xq, xd, xs, lv, R, h, C, 1);  /* h += MLP */
            }
            norm_rows(h, R, C, m->final_norm, m->eps, x, m->head.kind == ST_BLOCKS ? lv : 0, xq, xd, xs);
            matmul(&m->head, x, xq, xd, xs, lv, R, logits, m->V, 0);
        }
    }
    free(buf);
    return 0;
}
