/* y = x · wᵀ (then + other or · other) in fp32 on CPU, for the small batches of decoding; compiled and
 * loaded by decode_matmul.py, which also packs the weights.
 *
 * Packed weights: w [N, K] as groups of R consecutive rows interleaved by k, [ceil(N / R), K, R] (the last
 * group padded with zero rows), so that a group is one sequential stream through memory. A group is
 * multiplied with a tile of 16 (or 8) batch rows kept transposed in cache: one broadcast weight against a
 * vector of the tile's inputs per fused multiply-add, 12 accumulators. Every
 * output is one fused multiply-add chain over k in order, whatever the batch, the tile width or the threads
 * (which split the groups), so a row's result does not depend on the other rows of the batch. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define R 6                /* weight rows per packed group */
#define MAX_THREADS 256

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* an unaligned load */

enum { OP_NONE = 0, OP_ADD = 1, OP_MUL = 2 };

typedef struct {
    const float *xt;    /* the batch transposed per tile: tile t at xt + t * K * width, [K, width] */
    const float *w;     /* packed, [groups, K, R] */
    float *y;           /* [B, N], row stride ldy */
    const float *other; /* [B, N], row stride ldo, or NULL */
    int64_t B, K, N, ldy, ldo, g0, g1;
    int op, width;
} job;

/* rows [b0, b0 + width) x columns [n, n + R) of y from the accumulators, t[r][b] for column n + r, row b0 + b */
static void store(const job *j, int64_t b0, int64_t n, int width, const float t[R][16]) {
    const int64_t rows = j->B - b0 < width ? j->B - b0 : width, cols = j->N - n < R ? j->N - n : R;
    for (int64_t b = 0; b < rows; b++) {
        float *y = j->y + (b0 + b) * j->ldy + n;
        const float *o = j->other + (b0 + b) * j->ldo + n;
        if (j->op == OP_ADD) for (int64_t r = 0; r < cols; r++) y[r] = t[r][b] + o[r];
        else if (j->op == OP_MUL) for (int64_t r = 0; r < cols; r++) y[r] = t[r][b] * o[r];
        else for (int64_t r = 0; r < cols; r++) y[r] = t[r][b];
    }
}

/* group g against the 16 batch rows from b0 */
static void tile16(const job *j, int64_t g, int64_t b0) {
    const int64_t K = j->K;
    const float *p = j->w + g * K * R, *xt = j->xt + b0 * K;
    v8 a[R][2] = {{{0}}};
    for (int64_t k = 0; k < K; k++) {
        const v8 x0 = *(const v8u *)(xt + 16 * k), x1 = *(const v8u *)(xt + 16 * k + 8);
        for (int r = 0; r < R; r++) {
            const float s = p[R * k + r];
            a[r][0] += s * x0;
            a[r][1] += s * x1;
        }
    }
    float t[R][16];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < 16; b++) t[r][b] = a[r][b / 8][b % 8];
    store(j, b0, g * R, 16, t);
}

/* groups g and g + 1 (the same twice for a last odd one) against the 8 batch rows from b0 */
static void tile8(const job *j, int64_t g, int64_t b0) {
    const int64_t K = j->K, h = g + 1 < j->g1 ? g + 1 : g;
    const float *p = j->w + g * K * R, *q = j->w + h * K * R, *xt = j->xt + b0 * K;
    v8 a[R][2] = {{{0}}};
    for (int64_t k = 0; k < K; k++) {
        const v8 x = *(const v8u *)(xt + 8 * k);
        for (int r = 0; r < R; r++) {
            a[r][0] += p[R * k + r] * x;
            a[r][1] += q[R * k + r] * x;
        }
    }
    float t[2][R][16];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < 8; b++) {
            t[0][r][b] = a[r][0][b];
            t[1][r][b] = a[r][1][b];
        }
    store(j, b0, g * R, 8, t[0]);
    if (h != g) store(j, b0, h * R, 8, t[1]);
}

static void *run(void *arg) {
    const job *j = arg;
    const int step = j->width == 16 ? 1 : 2;
    for (int64_t g = j->g0; g < j->g1; g += step)
        for (int64_t b0 = 0; b0 < j->B; b0 += j->width) {
            if (j->width == 16) tile16(j, g, b0);
            else tile8(j, g, b0);
        }
    return NULL;
}

/* x [B, K] (row stride ldx) · w [N, K]ᵀ, w packed (above) -> y [B, N] (row stride ldy); op: OP_ADD adds
 * other, OP_MUL multiplies by it ([B, N], row stride ldo). threads split the groups. Returns 0, or -1 when
 * out of memory (nothing written). */
int ff_decode_matmul(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, const float *other,
                     int64_t ldo, int64_t B, int64_t K, int64_t N, int op, int threads) {
    const int width = B <= 8 ? 8 : 16;
    const int64_t tiles = (B + width - 1) / width, groups = (N + R - 1) / R;
    float *xt = calloc((size_t)(tiles * K * width), sizeof(float));
    if (xt == NULL) return -1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t k = 0; k < K; k++) xt[(b / width) * K * width + k * width + b % width] = x[b * ldx + k];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int64_t units = width == 16 ? groups : (groups + 1) / 2; /* a tile8 takes two groups */
    if (threads > units) threads = (int)units;
    const int64_t per = (units + threads - 1) / threads * (width == 16 ? 1 : 2);
    job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        const int64_t g0 = t * per < groups ? t * per : groups, g1 = (t + 1) * per < groups ? (t + 1) * per : groups;
        jobs[t] = (job){xt, w, y, other, B, K, N, ldy, ldo, g0, g1, op, width};
    }
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], NULL, run, &jobs[started]) != 0) break;
    for (int t = started; t < threads; t++) run(&jobs[t]); /* the threads that could not start run here */
    run(&jobs[0]);
    for (int t = 1; t < started; t++) pthread_join(ids[t], NULL);
    free(xt);
    return 0;
}
