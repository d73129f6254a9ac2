/* forkflow's decoding kernels for CPU, compiled and loaded by cpu_kernels.py (which also packs the weights):
 *
 * ff_matmul: y = x · wᵀ (then + other or · other) in fp32 for the small batches of decoding. Packed
 * weights: w [N, K] as groups of R consecutive rows interleaved by k, [ceil(N / R), K, R] (the last group
 * padded with zero rows), so that a group is one sequential stream through memory. A group is multiplied
 * with a tile of 16 (or 8) batch rows kept transposed in cache: one broadcast weight against a vector of the
 * tile's inputs per fused multiply-add, 12 accumulators. Every output is one fused multiply-add chain over k
 * in order, whatever the batch, the tile width or the threads (which split the groups), so a row's result
 * does not depend on the other rows of the batch.
 *
 * ff_block_softmax: one chunk of logits' pass of sampling.sample_plain (its maximum, exponentials, block
 * masses and Σ e·y) in two sweeps per row instead of eight torch ops over the chunk.
 *
 * ff_decode_attention: a decoding step's attention, one query token per row: the row's new key and value
 * written into its cache slot, then attention over the slot's keys and values up to the row's own length
 * (not the longest row's), each key/value head read once for its G query heads.
 *
 * Threads: a pool of workers started on first use and kept (creating a thread per call cost ~100 us on a
 * shared VM, more than a small projection's product). A worker spins for a short while after its share
 * (the next projection of a decoding step comes within microseconds), then sleeps on a condition variable.
 * Calls run one at a time; a forked child starts a pool of its own. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#define R 6                /* weight rows per packed group */
#define MAX_THREADS 256
#define SPINS 4000        /* polls of a worker (or the caller) before it sleeps: ~0.1 ms on Zen 3 */

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
        if (j->op == OP_NONE) {
            for (int64_t r = 0; r < cols; r++) y[r] = t[r][b];
            continue;
        }
        const float *o = j->other + (b0 + b) * j->ldo + n;
        if (j->op == OP_ADD) for (int64_t r = 0; r < cols; r++) y[r] = t[r][b] + o[r];
        else for (int64_t r = 0; r < cols; r++) y[r] = t[r][b] * o[r];
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

static void run_matmul(const void *jobs, int part) {
    const job *j = (const job *)jobs + part;
    const int step = j->width == 16 ? 1 : 2;
    for (int64_t g = j->g0; g < j->g1; g += step)
        for (int64_t b0 = 0; b0 < j->B; b0 += j->width) {
            if (j->width == 16) tile16(j, g, b0);
            else tile8(j, g, b0);
        }
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* The pool: worker t (1 <= t < started) runs task(context, t) each time its counter go[t] moves; pending
 * counts the workers of the current call still running. lock, wake and done only serve to sleep and wake. */
typedef void (*task_fn)(const void *context, int part);
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER, lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, done = PTHREAD_COND_INITIALIZER;
static task_fn task;
static const void *context;
static _Atomic uint64_t go[MAX_THREADS];
static _Atomic int pending;
static int started = 1, fork_handler;

static void *worker(void *arg) {
    const int t = (int)(intptr_t)arg;
    uint64_t seen = 0; /* go[t] is 0 until the worker's first call */
    for (;;) {
        for (int s = 0; s < SPINS && atomic_load_explicit(&go[t], memory_order_acquire) == seen; s++) relax();
        if (atomic_load_explicit(&go[t], memory_order_acquire) == seen) {
            pthread_mutex_lock(&lock);
            while (atomic_load(&go[t]) == seen) pthread_cond_wait(&wake, &lock);
            pthread_mutex_unlock(&lock);
        }
        seen = atomic_load(&go[t]);
        task(context, t);
        if (atomic_fetch_sub_explicit(&pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&lock);
            pthread_cond_signal(&done);
            pthread_mutex_unlock(&lock);
        }
    }
    return NULL;
}

/* fork() waits for a call in progress (call_lock), so that no lock is held in the child, where only the
 * forking thread exists: it starts workers of its own when it needs them. */
static void before_fork(void) { pthread_mutex_lock(&call_lock); }
static void after_fork_in_parent(void) { pthread_mutex_unlock(&call_lock); }
static void after_fork_in_child(void) {
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&lock, NULL);
    pthread_cond_init(&wake, NULL);
    pthread_cond_init(&done, NULL);
    for (int t = 0; t < MAX_THREADS; t++) atomic_store(&go[t], 0);
    atomic_store(&pending, 0);
    started = 1;
}

/* fn(ctx, part) for every part in [0, parts): workers run parts 1.., the caller part 0 (and the parts of
 * any worker that cannot start); returns when all are done. One call at a time. */
static void run_parts(task_fn fn, const void *ctx, int parts) {
    if (!fork_handler) fork_handler = pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) == 0;
    pthread_mutex_lock(&call_lock);
    for (; started < parts; started++) {
        pthread_t id;
        if (pthread_create(&id, NULL, worker, (void *)(intptr_t)started) != 0) break;
        pthread_detach(id);
    }
    const int workers = parts < started ? parts : started;
    task = fn;
    context = ctx;
    atomic_store(&pending, workers - 1);
    for (int t = 1; t < workers; t++) atomic_fetch_add_explicit(&go[t], 1, memory_order_release);
    if (workers > 1) {
        pthread_mutex_lock(&lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&lock);
    }
    for (int t = workers; t < parts; t++) fn(ctx, t);
    fn(ctx, 0);
    for (int s = 0; s < SPINS && atomic_load_explicit(&pending, memory_order_acquire) > 0; s++) relax();
    if (atomic_load_explicit(&pending, memory_order_acquire) > 0) {
        pthread_mutex_lock(&lock);
        while (atomic_load(&pending) > 0) pthread_cond_wait(&done, &lock);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_unlock(&call_lock);
}

static int clamp_threads(int threads, int64_t units) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > units) threads = (int)units;
    return threads < 1 ? 1 : threads;
}

/* x [B, K] (row stride ldx) · w [N, K]ᵀ, w packed (above) -> y [B, N] (row stride ldy); op: OP_ADD adds
 * other, OP_MUL multiplies by it ([B, N], row stride ldo). threads split the groups. Returns 0, or -1 when
 * out of memory (nothing written). */
int ff_matmul(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, const float *other,
              int64_t ldo, int64_t B, int64_t K, int64_t N, int op, int threads) {
    const int width = B <= 8 ? 8 : 16;
    const int64_t tiles = (B + width - 1) / width, groups = (N + R - 1) / R;
    float *xt = calloc((size_t)(tiles * K * width), sizeof(float));
    if (xt == NULL && tiles * K > 0) return -1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t k = 0; k < K; k++) xt[(b / width) * K * width + k * width + b % width] = x[b * ldx + k];
    const int64_t units = width == 16 ? groups : (groups + 1) / 2; /* a tile8 takes two groups */
    threads = clamp_threads(threads, units);
    const int64_t per = (units + threads - 1) / threads * (width == 16 ? 1 : 2);
    job jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        const int64_t g0 = t * per < groups ? t * per : groups, g1 = (t + 1) * per < groups ? (t + 1) * per : groups;
        jobs[t] = (job){xt, w, y, other, B, K, N, ldy, ldo, g0, g1, op, width};
    }
    run_parts(run_matmul, jobs, threads);
    free(xt);
    return 0;
}

#define EXP_LOWEST (-87.0f) /* exp_nonpositive's lowest argument: exp(-87) is near float's smallest normal */

/* exp(y) for y in [EXP_LOWEST, 0] (Cephes' expf: y = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial in r,
 * times 2^n through the exponent bits), within 2 ulp of the exact value */
typedef int32_t v8i __attribute__((vector_size(32)));
static inline v8 exp_nonpositive(v8 y) {
    const v8i n = __builtin_convertvector(y * 1.44269504088896341f - 0.5f, v8i); /* round(y / ln 2), y <= 0 */
    const v8 nf = __builtin_convertvector(n, v8);
    const v8 r = (y - nf * 0.693359375f) - nf * -2.12194440e-4f;
    v8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union { v8i i; v8 f; } scale = {.i = (n + 127) << 23};
    return p * scale.f;
}

static inline float hsum8(v8 a) {
    float s = 0;
    for (int l = 0; l < 8; l++) s += a[l];
    return s;
}

static inline v8 max8(v8 a, v8 b) {
    const v8i a_wins = a > b;
    return (v8)((a_wins & (v8i)a) | (~a_wins & (v8i)b));
}

typedef struct {
    float *z;        /* [B, blocks * block], contiguous: the logits in, exp(y) out */
    const float *m;  /* [B] the running maximum before the chunk */
    float *m_out, *w, *d; /* [B], [B, blocks], [B] */
    int64_t B, blocks, block, rows_per_part;
    float floor;
} softmax_job;

static void run_softmax(const void *arg, int part) {
    const softmax_job *j = arg;
    const int64_t n = j->blocks * j->block;
    for (int64_t b = part * j->rows_per_part; b < (part + 1) * j->rows_per_part && b < j->B; b++) {
        float *z = j->z + b * n;
        const v8 floor = (v8){0} + j->floor, inf = (v8){0} + __builtin_inff();
        const float nan = __builtin_nanf("");
        v8 top = {0};
        v8i bad = {0};
        top += j->m[b];
        for (int64_t i = 0; i < n; i += 8) {
            const v8 x = *(v8u *)(z + i);
            top = max8(x, top);
            bad |= (x != x) | (x == inf); /* NaN or +inf: the row's statistics become NaN, as with torch's ops */
        }
        float m = top[0];
        for (int l = 1; l < 8; l++) m = top[l] > m ? top[l] : m;
        double dot = 0;
        for (int64_t k = 0; k < j->blocks; k++) {
            v8 mass = {0}, ey = {0};
            for (int64_t i = k * j->block; i < (k + 1) * j->block; i += 8) {
                v8 y = *(v8u *)(z + i) - m;
                y = max8(y, floor);
                const v8 e = exp_nonpositive(y);
                *(v8u *)(z + i) = e;
                mass += e;
                ey += e * y;
            }
            j->w[b * j->blocks + k] = hsum8(mass);
            dot += hsum8(ey);
        }
        int broken = 0;
        for (int l = 0; l < 8; l++) broken |= bad[l];
        j->m_out[b] = broken ? nan : m;
        j->d[b] = broken ? nan : (float)dot;
    }
}

/* For each row b of z [B, blocks · block] (contiguous; block a multiple of 8): M' = max(m[b], max z[b]);
 * z[b] := e = exp(y) with y = max(z[b] - M', floor); w[b, k] = the sum of block k's e; d[b] = Σ e · y;
 * m_out[b] = M' (m_out[b] and d[b] NaN where z[b] holds a NaN or +inf). floor in [EXP_LOWEST, 0]. threads split
 * the rows. */
void ff_block_softmax(float *z, const float *m, float *m_out, float *w, float *d, int64_t B, int64_t blocks,
                      int64_t block, float floor, int threads) {
    if (!(floor >= EXP_LOWEST && floor <= 0.0f)) floor = EXP_LOWEST; /* exp_nonpositive's range */
    threads = clamp_threads(threads, B);
    const softmax_job j = {z, m, m_out, w, d, B, blocks, block, (B + threads - 1) / threads, floor};
    run_parts(run_softmax, &j, threads);
}

typedef struct {
    const float *q;                  /* row b's query heads [KV, G, D] at q + b * ldq */
    const float *k_new, *v_new;      /* row b's new key / value heads [KV, D] at + b * ld_new_k / ld_new_v */
    float *k, *v;                    /* [B.., KV, capacity, D]: row b's head h at (b * KV + h) * capacity * D */
    const int64_t *lengths;          /* [B] columns each row sees, its new key / value at the last */
    float *out;                      /* [B, KV, G, D] */
    int64_t ldq, ld_new_k, ld_new_v, KV, G, D, capacity, items;
    float scale;
    _Atomic int64_t *next;           /* the next (row, head) item to take */
} attention_job;

#define KEYS 64 /* keys per chunk of the online softmax */

/* one (row, key/value head) item: softmax(q_g · K[:n]ᵀ · scale) · V[:n] for each of its G query heads, over
 * chunks of KEYS keys with a running maximum and sum (the online softmax) */
static void attend_item(const attention_job *j, int64_t item) {
    const int64_t G = j->G, D = j->D, b = item / j->KV, h = item % j->KV, n = j->lengths[b];
    const float *q = j->q + b * j->ldq + h * G * D;
    float *K = j->k + item * j->capacity * D, *V = j->v + item * j->capacity * D;
    float *out = j->out + item * G * D;
    for (int64_t d = 0; d < D; d++) {
        K[(n - 1) * D + d] = j->k_new[b * j->ld_new_k + h * D + d];
        V[(n - 1) * D + d] = j->v_new[b * j->ld_new_v + h * D + d];
    }
    float s[G][KEYS], m[G], l[G];
    for (int64_t g = 0; g < G; g++) {
        m[g] = -__builtin_inff();
        l[g] = 0;
        for (int64_t d = 0; d < D; d++) out[g * D + d] = 0;
    }
    const v8 floor = (v8){0} + EXP_LOWEST;
    for (int64_t t0 = 0; t0 < n; t0 += KEYS) {
        const int64_t c = n - t0 < KEYS ? n - t0 : KEYS;
        for (int64_t t = 0; t < c; t++) {
            const float *key = K + (t0 + t) * D;
            for (int64_t g = 0; g < G; g++) {
                v8 a0 = {0}, a1 = {0};
                int64_t d = 0;
                for (; d + 16 <= D; d += 16) {
                    a0 += *(const v8u *)(q + g * D + d) * *(const v8u *)(key + d);
                    a1 += *(const v8u *)(q + g * D + d + 8) * *(const v8u *)(key + d + 8);
                }
                if (d < D) a0 += *(const v8u *)(q + g * D + d) * *(const v8u *)(key + d);
                s[g][t] = hsum8(a0 + a1) * j->scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float top = m[g];
            for (int64_t t = 0; t < c; t++) top = s[g][t] > top ? s[g][t] : top;
            /* exp(old max - new max) rescales what the earlier chunks summed (0 before the first chunk) */
            /* max8(floor, y) keeps a NaN y (a NaN query or key): the row's output becomes NaN, as with SDPA */
            const float rescale = exp_nonpositive(max8(floor, (v8){0} + (m[g] - top)))[0];
            for (int64_t t = c; t % 8; t++) s[g][t] = top; /* the last vector's lanes past the chunk */
            for (int64_t t = 0; t < c; t += 8)
                *(v8u *)(s[g] + t) = exp_nonpositive(max8(floor, *(v8u *)(s[g] + t) - top));
            float sum = 0;
            for (int64_t t = 0; t < c; t++) sum += s[g][t];
            l[g] = l[g] * rescale + sum;
            m[g] = top;
            if (rescale != 1.0f)
                for (int64_t d = 0; d < D; d += 8) *(v8u *)(out + g * D + d) *= rescale;
        }
        for (int64_t t = 0; t < c; t++) {
            const float *value = V + (t0 + t) * D;
            for (int64_t g = 0; g < G; g++) {
                const float p = s[g][t];
                for (int64_t d = 0; d < D; d += 8) *(v8u *)(out + g * D + d) += p * *(const v8u *)(value + d);
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const float inverse = 1.0f / l[g];
        for (int64_t d = 0; d < D; d += 8) *(v8u *)(out + g * D + d) *= inverse;
    }
}

static void run_attention(const void *arg, int part) {
    (void)part;
    const attention_job *j = arg;
    for (int64_t item; (item = atomic_fetch_add_explicit(j->next, 1, memory_order_relaxed)) < j->items;)
        attend_item(j, item);
}

/* Writes row b's new key and value heads ([KV, D] at k_new + b * ld_new_k, v_new + b * ld_new_v) at column
 * lengths[b] - 1 of its cache slot, then out [B, KV, G, D] = each row's attention over its first lengths[b]
 * (>= 1) columns of k and v [B.., KV, capacity, D] (row b in slot b), q row b's [KV, G, D] at q + b * ldq;
 * D a multiple of 8. threads take (row, head) items as they finish earlier ones; each item's result is the
 * same whichever takes it. */
void ff_decode_attention(const float *q, int64_t ldq, const float *k_new, int64_t ld_new_k, const float *v_new,
                         int64_t ld_new_v, float *k, float *v, const int64_t *lengths, float *out, int64_t B,
                         int64_t KV, int64_t G, int64_t D, int64_t capacity, float scale, int threads) {
    _Atomic int64_t next = 0;
    const attention_job j = {q, k_new, v_new, k, v, lengths, out, ldq, ld_new_k, ld_new_v, KV, G, D, capacity,
                             B * KV, scale, &next};
    run_parts(run_attention, &j, clamp_threads(threads, B * KV));
}
