/* The GGUF block matrix (qblocks.c; the format is described in qblocks.py) and the entry points step.c
   calls. Shared by both sources so the struct has one definition (qblocks.py's QbMat mirrors it). */
#ifndef LOGITLAB_QBLOCKS_H
#define LOGITLAB_QBLOCKS_H
#include <stdint.h>

typedef struct {
    int64_t out, in;
    int32_t bits, group, scale_f32, pad;
    const uint8_t *codes;
    const void *d;
    const void *m;
    /* optional (NULL: absent), made by qb_tile: the same weights 16 output rows to a vector (qblocks.c) */
    const uint8_t *tile_codes;
    const float *tile_d;
    const float *tile_m;
} qb_mat;

void qb_quantize(const float *x, int64_t R, int64_t in, int levels, int8_t *xq, float *xd, float *xs);
void qb_matmul_rows(const qb_mat *w, const int8_t *xq, const float *xd, const float *xs, int64_t R, int levels,
                    float *y, int64_t y_stride, int accumulate);
void qb_matmul(const qb_mat *w, const float *x, int64_t R, int levels, float *y);
void qb_dequant_rows(const qb_mat *w, const int64_t *ids, int64_t n, float *out);
void qb_dequant_bf16(const qb_mat *w, uint16_t *out);
int qb_tile_ok(const qb_mat *w);
void qb_tile(const qb_mat *w, uint8_t *codes, float *d, float *m);
void qb_set_tile_rows(int64_t rows);
#endif
