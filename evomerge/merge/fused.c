/* Merge passes in one read of the sources and one write of the output (evomerge/merge/native.py).

   torch runs these merges as ~5-20 passes over each chunk (convert, subtract, compare, multiply,
   add, divide, convert back); here every element is read once per source and written once.
   The arithmetic is torch's, operation by operation, in float32, so the bits are the same.
   Compile with -ffp-contract=off: a multiply-add rounds once where torch's separate mul_ and
   add_ round twice; linear's addcmul_ is the one place torch fuses them (fmaf below, measured):

     linear (weighted_sum):   acc = 0; acc = fma(x_i, w_i, acc) ...; [acc = acc / divisor]; out = acc
     task arithmetic, TIES, breadcrumbs (banded_merge): d_i = (x_i - b) * keep_i * w_i;
                              acc = 0; acc = acc + d_i ... (or TIES's sign-consensus sum);
                              [acc = acc / divisor]; [acc = acc * lambda]; out = acc + b

   native.py checks the fmaf premise on load against torch itself and falls back if it fails.
   Conversions: bfloat16 <-> float32 as torch (round to nearest even); float16 by the CPU's
   F16C instructions (torch's too) or the compiler's _Float16, both IEEE. Blocks of BLOCK
   elements stay in L1; threads split the blocks. */

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };
#ifndef BLOCK /* the merge pass holds ~10 float arrays of BLOCK: 256 keeps them in a 32 KB L1 (1024 did not:
                 task arithmetic of 4 bf16 sources, 24.6M elements, 2 threads: 14.4 ms at 1024, 6.6 at 256,
                 7.4 at 128; linear 8.7 / 5.8 / 6.6 ms) */
#define BLOCK 256
#endif
#define MAX_THREADS 256
#define MIN_BLOCKS_PER_THREAD (65536 / BLOCK) /* 64k elements: below that a thread costs more than it saves */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static void to_f32(float *dst, const void *src, int dtype, int64_t start, int64_t m) {
    if (dtype == F32) {
        memcpy(dst, (const float *)src + start, (size_t)m * sizeof(float));
    } else if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int64_t j = 0; j < m; j++) dst[j] = bf16_to_f32(s[j]);
    } else {
        const _Float16 *s = (const _Float16 *)src + start;
        int64_t j = 0;
#ifdef __F16C__ /* GCC 12 does not vectorize _Float16 conversions itself */
        for (; j + 8 <= m; j += 8) _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + j))));
#endif
        for (; j < m; j++) dst[j] = (float)s[j];
    }
}

static void from_f32(void *dst, const float *src, int dtype, int64_t start, int64_t m) {
    if (dtype == F32) {
        memcpy((float *)dst + start, src, (size_t)m * sizeof(float));
    } else if (dtype == BF16) {
        uint16_t *d = (uint16_t *)dst + start;
        for (int64_t j = 0; j < m; j++) {
            uint32_t u;
            memcpy(&u, src + j, sizeof u);
            uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            d[j] = (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
        }
    } else {
        _Float16 *d = (_Float16 *)dst + start;
        int64_t j = 0;
#ifdef __F16C__
        for (; j + 8 <= m; j += 8)
            _mm_storeu_si128((__m128i *)(d + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; j < m; j++) d[j] = (_Float16)src[j];
    }
}

/* Threads for a pass over `blocks` blocks: at most `threads`, each with at least MIN_BLOCKS_PER_THREAD. */
static int32_t thread_count(int64_t blocks, int32_t threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks / MIN_BLOCKS_PER_THREAD) threads = (int32_t)(blocks / MIN_BLOCKS_PER_THREAD);
    return threads < 1 ? 1 : threads;
}

/* run(job t) for t < threads, job 0 on this thread. Plain pthreads: an OpenMP runtime of our own
   would spin against torch's. A thread that cannot be had runs its job here. */
static void run_parallel(void *(*run)(void *), void *jobs, size_t job_size, int32_t threads) {
    pthread_t helpers[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int32_t t = 1; t < threads; t++)
        started[t] = pthread_create(&helpers[t], NULL, run, (char *)jobs + t * job_size) == 0;
    run(jobs);
    for (int32_t t = 1; t < threads; t++) {
        if (started[t]) pthread_join(helpers[t], NULL);
        else run((char *)jobs + t * job_size);
    }
}

struct job {
    int64_t n, first_block, last_block;
    int32_t n_sources, normalize, out_dtype;
    const void *const *sources;
    const int32_t *source_dtypes;
    const float *weights;
    float divisor;
    void *out;
};

static void *run(void *arg) {
    const struct job *q = arg;
    float acc[BLOCK], x[BLOCK];
    for (int64_t k = q->first_block; k < q->last_block; k++) {
        int64_t start = k * BLOCK, m = q->n - start < BLOCK ? q->n - start : BLOCK;
        for (int64_t j = 0; j < m; j++) acc[j] = 0.0f;
        for (int32_t i = 0; i < q->n_sources; i++) {
            float w = q->weights[i];
            if (q->source_dtypes[i] == BF16) { /* the common case, converted in the same loop */
                const uint16_t *s = (const uint16_t *)q->sources[i] + start;
                for (int64_t j = 0; j < m; j++) acc[j] = fmaf(bf16_to_f32(s[j]), w, acc[j]);
                continue;
            }
            to_f32(x, q->sources[i], q->source_dtypes[i], start, m);
            for (int64_t j = 0; j < m; j++) acc[j] = fmaf(x[j], w, acc[j]);
        }
        if (q->normalize)
            for (int64_t j = 0; j < m; j++) acc[j] = acc[j] / q->divisor;
        from_f32(q->out, acc, q->out_dtype, start, m);
    }
    return NULL;
}

/* linear: out[j] = sum_i w_i * sources[i][j] (divided by `divisor` when normalize), for j < n. */
void weighted_sum(int64_t n, int32_t n_sources, const void *const *sources, const int32_t *source_dtypes,
                  const float *weights, int32_t normalize, float divisor, void *out, int32_t out_dtype,
                  int32_t threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    threads = thread_count(blocks, threads);
    struct job jobs[MAX_THREADS];
    for (int32_t t = 0; t < threads; t++)
        jobs[t] = (struct job){n, blocks * t / threads, blocks * (t + 1) / threads, n_sources, normalize, out_dtype,
                               sources, source_dtypes, weights, divisor, out};
    run_parallel(run, jobs, sizeof jobs[0], threads);
}

/* ---- magnitude trims (TIES, breadcrumbs): evomerge/merge/trim.py finds each delta's band of ranks
   from order statistics of its magnitude keys, key = the bits of |f32(x) - f32(b)| as an integer
   (trim.magnitude_keys); these passes compute the keys on the fly, never storing them. */

/* d = f32(x) - base over one block (base already float32) */
static void delta_block(float *d, const void *x, int xd, const float *base, int64_t start, int64_t m) {
    if (xd == BF16) { /* the common case, converted in the same loop */
        const uint16_t *s = (const uint16_t *)x + start;
        for (int64_t j = 0; j < m; j++) d[j] = bf16_to_f32(s[j]) - base[j];
        return;
    }
    to_f32(d, x, xd, start, m);
    for (int64_t j = 0; j < m; j++) d[j] = d[j] - base[j];
}

static void keys_block(int32_t *k, const float *d, int64_t m) {
    for (int64_t j = 0; j < m; j++) {
        uint32_t u;
        memcpy(&u, d + j, sizeof u);
        k[j] = (int32_t)(u & 0x7FFFFFFFu);
    }
}

static void keys_of_block(int32_t *k, float *d, const void *x, int xd, const void *b, int bd, int64_t start, int64_t m) {
    float base[BLOCK];
    to_f32(base, b, bd, start, m);
    delta_block(d, x, xd, base, start, m);
    keys_block(k, d, m);
}

#define MAX_BRACKETS 4
#define POOL_PAD 16 /* slots past each thread's cap: a whole vector is stored where its keys fit */

struct bracket_job {
    const void *x, *b;
    int32_t xd, bd, n_brackets;
    int64_t n, first_block, last_block, cap;
    const int64_t *lows, *highs; /* highs[i] < 0: no upper bound */
    const int32_t *wide;
    int64_t below[MAX_BRACKETS], equal[MAX_BRACKETS], gathered;
    int32_t *pool;
};

static void *bracket_run(void *arg) {
    struct bracket_job *q = arg;
    int32_t k[BLOCK];
    float d[BLOCK];
    int64_t g = 0;
    for (int64_t blk = q->first_block; blk < q->last_block; blk++) {
        int64_t start = blk * BLOCK, m = q->n - start < BLOCK ? q->n - start : BLOCK;
        keys_of_block(k, d, q->x, q->xd, q->b, q->bd, start, m);
        int any_wide = 0;
        for (int32_t r = 0; r < q->n_brackets; r++) {
            int64_t low = q->lows[r], c = 0;
            if (low > 0) {
                for (int64_t j = 0; j < m; j++) c += k[j] < low;
                q->below[r] += c;
            }
            if (!q->wide[r]) {
                c = 0;
                for (int64_t j = 0; j < m; j++) c += k[j] == low;
                q->equal[r] += c;
            } else {
                any_wide = 1;
            }
        }
        if (!any_wide) continue;
        int64_t j = 0;
#ifdef __AVX512F__ /* gather 16 keys at a time */
        for (; j + 16 <= m; j += 16) {
            __m512i v = _mm512_loadu_si512((const void *)(k + j));
            __mmask16 in = 0;
            for (int32_t r = 0; r < q->n_brackets; r++) {
                if (!q->wide[r]) continue;
                __mmask16 w = _mm512_cmpge_epi32_mask(v, _mm512_set1_epi32((int32_t)q->lows[r]));
                if (q->highs[r] >= 0) w &= _mm512_cmple_epi32_mask(v, _mm512_set1_epi32((int32_t)q->highs[r]));
                in |= w;
            }
            int c = __builtin_popcount((unsigned)in);
            /* compress in a register, store all 16 lanes (the store form is microcoded on AMD's Zen 4) */
            if (c && g + c <= q->cap) _mm512_storeu_si512((void *)(q->pool + g), _mm512_maskz_compress_epi32(in, v));
            g += c;
        }
#endif
        for (; j < m; j++) {
            int inside = 0;
            for (int32_t r = 0; r < q->n_brackets; r++)
                inside |= q->wide[r] & (k[j] >= q->lows[r]) & (q->highs[r] < 0 || k[j] <= q->highs[r]);
            q->pool[g < q->cap ? g : q->cap] = k[j]; /* past cap: the slots beyond take the overflow */
            g += inside;
        }
    }
    q->gathered = g;
    return NULL;
}

/* One pass over the keys of x - b: per bracket, how many keys lie below lows[r] (below), and for a
   one-value bracket (wide[r] == 0) how many equal it (equal); the keys inside the wide brackets are
   copied into pool, thread t's at pool + t * (cap + POOL_PAD), their number into gathered[t] (more than
   cap: they did not fit, call again with a larger cap). Returns the number of threads used. */
int32_t bracket_pass(int64_t n, const void *x, int32_t xd, const void *b, int32_t bd, int32_t n_brackets,
                     const int64_t *lows, const int64_t *highs, const int32_t *wide, int64_t *below, int64_t *equal,
                     int32_t *pool, int64_t cap, int64_t *gathered, int32_t threads) {
    if (n_brackets > MAX_BRACKETS) return 0; /* native.py never asks: the counts below are this big */
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    threads = thread_count(blocks, threads);
    struct bracket_job jobs[MAX_THREADS];
    for (int32_t t = 0; t < threads; t++)
        jobs[t] = (struct bracket_job){x, b, xd, bd, n_brackets, n, blocks * t / threads, blocks * (t + 1) / threads,
                                       cap, lows, highs, wide, {0}, {0}, 0, pool + t * (cap + POOL_PAD)};
    run_parallel(bracket_run, jobs, sizeof jobs[0], threads);
    for (int32_t r = 0; r < n_brackets; r++) {
        below[r] = equal[r] = 0;
        for (int32_t t = 0; t < threads; t++) below[r] += jobs[t].below[r], equal[r] += jobs[t].equal[r];
    }
    for (int32_t t = 0; t < threads; t++) gathered[t] = jobs[t].gathered;
    return threads;
}

/* The position of the j-th (0-based) key of x - b equal to value, in order of position; -1 if none. */
int64_t nth_equal(int64_t n, const void *x, int32_t xd, const void *b, int32_t bd, int64_t value, int64_t j) {
    int32_t k[BLOCK];
    float d[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK, c = 0;
        keys_of_block(k, d, x, xd, b, bd, start, m);
        for (int64_t i = 0; i < m; i++) c += k[i] == value;
        if (j >= c) {
            j -= c;
            continue;
        }
        for (int64_t i = 0; i < m; i++)
            if (k[i] == value && j-- == 0) return start + i;
    }
    return -1;
}

/* A band of kept keys (trim.Band): key > above (when has_above), key < below (when has_below), or
   key == value at positions [first, stop) for each run. trims == 0: keep every entry. */
struct band {
    int32_t trims, has_above, has_below, n_runs;
    int64_t above, below;
    int64_t value[2], first[2], stop[2];
};

#define MAX_SOURCES 4

struct banded_job {
    int64_t n, first_block, last_block;
    int32_t n_sources, base_dtype, consensus, normalize, scale, out_dtype;
    const void *const *sources;
    const int32_t *source_dtypes;
    const void *base;
    const float *deltas, *scales;
    const int32_t *scaled;
    const struct band *bands;
    const float *weights;
    float divisor, lambda;
    void *out;
};

static void *banded_run(void *arg) {
    const struct banded_job *q = arg;
    float d[MAX_SOURCES][BLOCK], acc[BLOCK], b[BLOCK], majority[BLOCK], agree_w[BLOCK];
    int32_t k[BLOCK], keep[BLOCK];
    for (int64_t blk = q->first_block; blk < q->last_block; blk++) {
        int64_t start = blk * BLOCK, m = q->n - start < BLOCK ? q->n - start : BLOCK;
        to_f32(b, q->base, q->base_dtype, start, m);
        for (int64_t j = 0; j < m; j++) acc[j] = 0.0f;
        for (int32_t i = 0; i < q->n_sources; i++) { /* the trimmed delta, times its weight */
            const struct band *t = &q->bands[i];
            float *di = d[i], w = q->weights[i];
            if (!t->trims && !q->consensus && !q->deltas && q->source_dtypes[i] == BF16) {
                /* task arithmetic's common case in one loop: acc = acc + (x - b) * w, rounded as above */
                const uint16_t *s = (const uint16_t *)q->sources[i] + start;
                for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + (bf16_to_f32(s[j]) - b[j]) * w;
                continue;
            }
            if (q->deltas) {
                memcpy(di, q->deltas + i * q->n + start, (size_t)m * sizeof(float));
                if (q->scaled && q->scaled[i]) /* the L1 rescale's factor, where there is one */
                    for (int64_t j = 0; j < m; j++) di[j] = di[j] * q->scales[i];
            } else
                delta_block(di, q->sources[i], q->source_dtypes[i], b, start, m);
            if (t->trims) {
                keys_block(k, di, m);
                int32_t above = t->has_above ? (int32_t)t->above : -1; /* keys are >= 0 */
                for (int64_t j = 0; j < m; j++) keep[j] = k[j] > above;
                if (t->has_below)
                    for (int64_t j = 0; j < m; j++) keep[j] &= k[j] < (int32_t)t->below;
                for (int32_t r = 0; r < t->n_runs; r++) {
                    int64_t from = t->first[r] - start, upto = t->stop[r] - start;
                    int32_t value = (int32_t)t->value[r];
                    for (int64_t j = from < 0 ? 0 : from; j < (upto < m ? upto : m); j++) keep[j] |= k[j] == value;
                }
                for (int64_t j = 0; j < m; j++) di[j] = di[j] * (float)keep[j];
            }
            if (q->consensus)
                for (int64_t j = 0; j < m; j++) di[j] = di[j] * w;
            else /* the running sum: acc = acc + (d * w), rounded twice as torch's mul_ then add_ */
                for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + di[j] * w;
        }
        if (!q->consensus) {
            if (q->normalize)
                for (int64_t j = 0; j < m; j++) acc[j] = acc[j] / q->divisor;
        } else { /* TIES: elect the sign of the summed weighted deltas (0 counts as +), sum those that agree */
            for (int64_t j = 0; j < m; j++) acc[j] = 0.0f;
            for (int32_t i = 0; i < q->n_sources; i++)
                for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + d[i][j];
            for (int64_t j = 0; j < m; j++) {
                majority[j] = acc[j] >= 0.0f ? 1.0f : -1.0f;
                acc[j] = agree_w[j] = 0.0f;
            }
            for (int32_t i = 0; i < q->n_sources; i++) {
                float w = q->weights[i];
                for (int64_t j = 0; j < m; j++) {
                    float agree = (float)(majority[j] > 0.0f ? d[i][j] > 0.0f : d[i][j] < 0.0f);
                    acc[j] = acc[j] + d[i][j] * agree;
                    agree_w[j] = agree_w[j] + w * agree;
                }
            }
            for (int64_t j = 0; j < m; j++) agree_w[j] = agree_w[j] == 0.0f ? 1.0f : agree_w[j];
            if (q->normalize)
                for (int64_t j = 0; j < m; j++) acc[j] = acc[j] / agree_w[j];
        }
        if (q->scale)
            for (int64_t j = 0; j < m; j++) acc[j] = acc[j] * q->lambda;
        for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + b[j];
        from_f32(q->out, acc, q->out_dtype, start, m);
    }
    return NULL;
}

/* out = b + lambda * combine_i(w_i * trim_i(x_i - b)) in generalized_task_arithmetic's order, where
   combine is the running sum (divided by `divisor` when normalize) or, with consensus, TIES's
   sign-consensus sum (divided by the agreeing weights when normalize). At most MAX_SOURCES. With
   `deltas` (float32, n_sources x n: DARE's and DELLA's masked deltas) the deltas are read from
   there instead of computed from the sources, each first multiplied by its L1 rescale factor in
   `scales` where `scaled` says it has one (both NULL: none has). */
void banded_merge(int64_t n, int32_t n_sources, const void *const *sources, const int32_t *source_dtypes,
                  const void *base, int32_t base_dtype, const float *deltas, const float *scales,
                  const int32_t *scaled, const struct band *bands, const float *weights,
                  int32_t consensus, int32_t normalize, float divisor, int32_t scale, float lambda, void *out,
                  int32_t out_dtype, int32_t threads) {
    if (n_sources > MAX_SOURCES) return; /* native.py never asks: the arrays below are this big */
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    threads = thread_count(blocks, threads);
    struct banded_job jobs[MAX_THREADS];
    for (int32_t t = 0; t < threads; t++)
        jobs[t] = (struct banded_job){n, blocks * t / threads, blocks * (t + 1) / threads, n_sources, base_dtype,
                                      consensus, normalize, scale, out_dtype, sources, source_dtypes, base, deltas,
                                      scales, scaled, bands, weights, divisor, lambda, out};
    run_parallel(banded_run, jobs, sizeof jobs[0], threads);
}

/* ---- A source's float32 delta for DARE and DELLA (task_arithmetic._sparse_deltas):
   delta = f32(x) - f32(b), and |delta| into `magnitude` where given (the L1 rescale's sum). */

struct delta_job {
    int64_t n, first_block, last_block;
    const void *x, *b;
    int32_t xd, bd;
    float *delta, *magnitude;
};

static void *delta_run(void *arg) {
    const struct delta_job *q = arg;
    float base[BLOCK];
    for (int64_t blk = q->first_block; blk < q->last_block; blk++) {
        int64_t start = blk * BLOCK, m = q->n - start < BLOCK ? q->n - start : BLOCK;
        to_f32(base, q->b, q->bd, start, m);
        delta_block(q->delta + start, q->x, q->xd, base, start, m);
        if (q->magnitude)
            for (int64_t j = 0; j < m; j++) q->magnitude[start + j] = fabsf(q->delta[start + j]);
    }
    return NULL;
}

void source_delta(int64_t n, const void *x, int32_t xd, const void *b, int32_t bd, float *delta, float *magnitude,
                  int32_t threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    threads = thread_count(blocks, threads);
    struct delta_job jobs[MAX_THREADS];
    for (int32_t t = 0; t < threads; t++)
        jobs[t] = (struct delta_job){n, blocks * t / threads, blocks * (t + 1) / threads, x, b, xd, bd, delta, magnitude};
    run_parallel(delta_run, jobs, sizeof jobs[0], threads);
}

/* ---- The draws of DARE and DELLA applied to a source's float32 delta in place, as
   task_arithmetic.DrawnMask does in torch: delta = delta * (draw < p ? 1 : 0), then
   [delta = delta / divisor] (rescale_mode inverse_density), and |delta| into `magnitude` where
   given (the L1 rescale's sum, which torch then takes). p is `threshold` for every entry (DARE),
   or DELLA's ramp at the entry's magnitude rank in its row (row_ramp). */

/* delta * (draw < p): as a 0/1 float (no branch on a coin flip), as torch multiplies by the mask
   made float: signed zeros and NaN kept */
static inline float kept(float delta, float draw, float p) { return delta * (float)(draw < p); }

/* then, over a stretch already masked: [/ divisor], and |delta| into magnitude where given */
static void keep_finish(float *d, int64_t m, int32_t divide, float divisor, float *magnitude) {
    if (divide)
        for (int64_t j = 0; j < m; j++) d[j] = d[j] / divisor;
    if (magnitude)
        for (int64_t j = 0; j < m; j++) magnitude[j] = fabsf(d[j]);
}

struct keep_job {
    int64_t first, last;
    float *delta, *magnitude;
    const float *draws;
    float threshold, divisor;
    int32_t divide;
};

static void *keep_run(void *arg) {
    const struct keep_job *q = arg;
    for (int64_t start = q->first; start < q->last; start += BLOCK) { /* a block at a time: finished in L1 */
        int64_t m = q->last - start < BLOCK ? q->last - start : BLOCK;
        float *d = q->delta + start;
        for (int64_t j = 0; j < m; j++) d[j] = kept(d[j], q->draws[start + j], q->threshold);
        keep_finish(d, m, q->divide, q->divisor, q->magnitude ? q->magnitude + start : NULL);
    }
    return NULL;
}

/* DARE: every entry kept where its draw is below `threshold`. */
void keep_drawn(int64_t n, float *delta, const float *draws, float threshold, int32_t divide, float divisor,
                float *magnitude, int32_t threads) {
    threads = thread_count((n + BLOCK - 1) / BLOCK, threads);
    struct keep_job jobs[MAX_THREADS];
    for (int32_t t = 0; t < threads; t++) /* whole blocks per thread: no two threads share a cache line */
        jobs[t] = (struct keep_job){(n * t / threads) / BLOCK * BLOCK, t + 1 == threads ? n : (n * (t + 1) / threads) / BLOCK * BLOCK,
                                    delta, magnitude, draws, threshold, divisor, divide};
    run_parallel(keep_run, jobs, sizeof jobs[0], threads);
}

/* ---- DELLA (evomerge/merge/della.py): each entry's keep probability is a ramp over its magnitude
   rank within its row, equal magnitudes ranked by position (a stable sort). A stable LSD radix
   sort of each row's (key, column) pairs, on the bits where the row's keys differ only (those
   of a bf16 model's delta differ in ~20: 2-3 passes), gives the order, ~8 ns an entry on one
   thread here (numpy's sort: ~12, torch's stable argsort ~48); the ramp's value for each rank
   is written where that entry sits, or, given the draws, compared with that entry's draw there
   and then (kept). */

#define RADIX_BITS 11

struct ramp_job {
    int64_t cols, first_row, last_row;
    float *delta, *prob, *magnitude;
    const float *ramp, *draws;
    float divisor;
    int32_t divide, rising; /* rising: the ramp never falls (epsilon >= 0), as row_thresholds needs */
    uint64_t *items; /* 2 x cols: key << 32 | column */
    uint32_t *keys;  /* 2 x cols: the row's keys, then its undecided columns */
    uint32_t *hist;  /* every digit's histogram, then its next places */
    float *row;      /* cols: one row's probabilities, with draws */
};

static uint32_t row_keys(const float *d, int64_t cols, uint32_t *keys) {
    /* keys[c] = the bits of |d[c]|; returns the bits where they differ */
    uint32_t differ = 0, first;
    memcpy(&first, d, sizeof first);
    first &= 0x7FFFFFFFu;
    for (int64_t c = 0; c < cols; c++) {
        uint32_t k;
        memcpy(&k, d + c, sizeof k);
        keys[c] = k & 0x7FFFFFFFu;
        differ |= keys[c] ^ first;
    }
    return differ;
}

/* The columns of one row in a stable ascending order of their keys (row_keys; ties by column), into
   `items` (2 x cols uint64 of room), returned as uint32 column numbers. Only the bits where the
   row's keys differ are sorted, low digit first, with every digit's histogram counted in one read;
   where those bits and the column's fit in 32 (most rows of a bf16 model's delta: ~17-22 bits and
   10-11), the items are (bits << column bits | column) in 32 bits, else (key << 32 | column). */
static uint32_t *row_sort(const uint32_t *keys, uint32_t differ, int64_t cols, uint64_t *items, uint32_t *hist,
                          int max_width) {
    int low = differ ? __builtin_ctz(differ) : 0, bits = differ ? 32 - __builtin_clz(differ) - low : 0;
    int colbits = cols > 1 ? 64 - __builtin_clzll((uint64_t)(cols - 1)) : 0;
    int narrow = bits + colbits <= 32;
    /* digits whose histogram is about as long as the row at most (wider digits mean fewer passes,
       but each pass sums its histogram; with every histogram counted in one read, bins of about
       the row's length sorted rows of 768 and 2048 fastest here: 2 passes over ~20 bits) */
    int digits = (bits + max_width - 1) / max_width, width = digits ? (bits + digits - 1) / digits : 0;
    uint32_t bins = (uint32_t)1 << width, kmask = bits == 32 ? 0xFFFFFFFFu : ((uint32_t)1 << bits) - 1;
    memset(hist, 0, (size_t)digits * bins * sizeof *hist);
    uint32_t *n32 = (uint32_t *)items, *t32 = n32 + cols; /* narrow: cols + cols uint32 */
    uint64_t *a = items, *t = items + cols;
    int base_shift = narrow ? colbits : 32;
    for (int64_t c = 0; c < cols; c++) {
        uint32_t key = (keys[c] >> low) & kmask;
        if (narrow) n32[c] = key << colbits | (uint32_t)c;
        else a[c] = (uint64_t)key << 32 | (uint64_t)c;
        for (int pass = 0; pass < digits; pass++) hist[pass * bins + ((key >> (pass * width)) & (bins - 1))]++;
    }
    for (int pass = 0; pass < digits; pass++) {
        uint32_t *at = hist + pass * bins, sum = 0;
        for (uint32_t digit = 0; digit < bins; digit++) {
            uint32_t n = at[digit];
            at[digit] = sum;
            sum += n;
        }
        int shift = base_shift + pass * width;
        if (narrow) {
            for (int64_t c = 0; c < cols; c++) t32[at[(n32[c] >> shift) & (bins - 1)]++] = n32[c];
            uint32_t *swap = n32; n32 = t32; t32 = swap;
        } else {
            for (int64_t c = 0; c < cols; c++) t[at[(a[c] >> shift) & (bins - 1)]++] = a[c];
            uint64_t *swap = a; a = t; t = swap;
        }
    }
    uint32_t *order = (uint32_t *)(narrow ? (void *)n32 : (void *)a);
    if (narrow) {
        uint32_t colmask = colbits ? (uint32_t)(((uint64_t)1 << colbits) - 1) : 0;
        for (int64_t r = 0; r < cols; r++) order[r] = n32[r] & colmask;
    } else {
        for (int64_t r = 0; r < cols; r++) order[r] = (uint32_t)a[r]; /* item r is read before slot r is written */
    }
    return order;
}

/* With the draws, most entries need no rank: the ramp rises with the rank, so an entry whose rank
   lies in [lo, hi] is kept if its draw is below ramp[lo] and dropped if it is at least ramp[hi].
   One histogram of the keys' top differing bits gives every entry such a range (the entries of
   lower buckets below it, those of its own bucket beside it); only an entry whose draw falls
   between ramp[lo] and ramp[hi] (~1% of a bf16 delta's row of 768 at epsilon 0.15) gets its
   exact rank, by counting the keys below its own (ties by column). Fills p with a threshold per
   entry that gives the same comparison as ramp[rank] (2: kept whatever the draw, 0: dropped) and
   returns 1; returns 0, p unfinished, where more than UNDECIDED_MOST entries are left (many equal
   magnitudes): the caller sorts the row instead. */
#define UNDECIDED_MOST 64

static int row_thresholds(const uint32_t *keys, uint32_t differ, const float *u, const float *ramp, int64_t cols,
                          uint32_t *undecided, uint32_t *hist, int max_width, float *p) {
    int high = differ ? 32 - __builtin_clz(differ) : 0, width = high < max_width ? high : max_width, shift = high - width;
    uint32_t bins = (uint32_t)1 << width;
    memset(hist, 0, ((size_t)bins + 1) * sizeof *hist);
    for (int64_t c = 0; c < cols; c++) hist[((keys[c] >> shift) & (bins - 1)) + 1]++;
    for (uint32_t b = 1; b <= bins; b++) hist[b] += hist[b - 1]; /* bucket b holds ranks hist[b] .. hist[b+1]-1 */
    for (int64_t c = 0; c < cols; c++) { /* -1: undecided */
        uint32_t b = (keys[c] >> shift) & (bins - 1);
        float below = ramp[hist[b]], top = ramp[hist[b + 1] - 1];
        int keep = u[c] < below, open = !keep & (u[c] < top); /* no branch on a coin flip */
        p[c] = (float)(2 * keep - open);
    }
    int64_t n = 0;
    for (int64_t c = 0; c < cols; c++)
        if (p[c] < 0.0f) {
            if (n == UNDECIDED_MOST) return 0;
            undecided[n++] = (uint32_t)c;
        }
    for (int64_t i = 0; i < n; i++) {
        uint32_t c = undecided[i], k = keys[c], rank = 0;
        for (uint32_t j = 0; j < c; j++) rank += keys[j] <= k;
        for (int64_t j = c + 1; j < cols; j++) rank += keys[j] < k;
        p[c] = ramp[rank];
    }
    return 1;
}

static void *ramp_run(void *arg) {
    struct ramp_job *q = arg;
    int64_t cols = q->cols;
    int max_width = 4;
    while (max_width < RADIX_BITS && ((int64_t)1 << max_width) < cols) max_width++;
    for (int64_t row = q->first_row; row < q->last_row; row++) {
        float *dd = q->delta + row * cols, *p = q->draws ? q->row : q->prob + row * cols;
        uint32_t differ = row_keys(dd, cols, q->keys);
        const float *u = q->draws ? q->draws + row * cols : NULL;
        if (!u || !q->rising || !row_thresholds(q->keys, differ, u, q->ramp, cols, q->keys + cols, q->hist, max_width, p)) {
            uint32_t *order = row_sort(q->keys, differ, cols, q->items, q->hist, max_width);
            for (int64_t r = 0; r < cols; r++) p[order[r]] = q->ramp[r]; /* with draws: scattered in cache, read in order */
        }
        if (u) {
            for (int64_t c = 0; c < cols; c++) dd[c] = kept(dd[c], u[c], p[c]);
            keep_finish(dd, cols, q->divide, q->divisor, q->magnitude ? q->magnitude + row * cols : NULL);
        }
    }
    return NULL;
}

/* p = ramp[rank of |delta[row][c]| in a stable ascending sort of its row], float32 rows x cols:
   into prob[row][c], or, with `draws` (prob then unused), applied to delta in place by
   kept and keep_finish. Returns 0, or -1 when memory for the sort could not be had (delta then unchanged). */
int32_t row_ramp(int64_t rows, int64_t cols, float *delta, const float *ramp, float *prob, const float *draws,
                 int32_t divide, float divisor, float *magnitude, int32_t threads) {
    if (rows <= 0 || cols <= 0) return 0; /* nothing to sort (and malloc(0) may say no) */
    /* a thread for every MIN_BLOCKS_PER_THREAD * BLOCK entries at least, whole rows each */
    int64_t per_thread = (int64_t)MIN_BLOCKS_PER_THREAD * BLOCK;
    int64_t most = (rows * cols) / per_thread;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > most) threads = (int32_t)most;
    if (threads > rows) threads = (int32_t)rows;
    if (threads < 1) threads = 1;
    struct ramp_job jobs[MAX_THREADS];
    int failed = 0, rising = 1;
    for (int64_t r = 1; r < cols; r++) rising &= ramp[r - 1] <= ramp[r];
    for (int32_t t = 0; t < threads; t++) { /* all memory first: a failure changes nothing */
        jobs[t] = (struct ramp_job){cols, rows * t / threads, rows * (t + 1) / threads, delta, prob, magnitude, ramp, draws,
                                    divisor, divide, rising, malloc(2 * (size_t)cols * sizeof(uint64_t)),
                                    malloc(2 * (size_t)cols * sizeof(uint32_t)), malloc(((size_t)32 << RADIX_BITS) * sizeof(uint32_t)),
                                    malloc((size_t)cols * sizeof(float))};
        failed |= !jobs[t].items || !jobs[t].keys || !jobs[t].hist || !jobs[t].row;
    }
    if (!failed) run_parallel(ramp_run, jobs, sizeof jobs[0], threads);
    for (int32_t t = 0; t < threads; t++) free(jobs[t].items), free(jobs[t].keys), free(jobs[t].hist), free(jobs[t].row);
    return failed ? -1 : 0;
}

/* ---- The mask draws of DARE and DELLA (evomerge/merge/rng.py): torch.rand's float32 values on
   the CPU for a generator seeded by manual_seed(seed). torch's CPU generator is MT19937,
   initialized from the seed's low 32 bits (init_genrand), and each float32 draw is the next
   32-bit output's low 24 bits times 2^-24, in order; native.py checks that against torch.rand on
   load. torch draws one at a time (~4.3 ns an entry here); regenerating the 624-word state in
   vector loops and tempering a block at a time takes a fraction of that, with the same bits. */

#define MT_N 624
#define MT_M 397

static inline uint32_t mt_mix(uint32_t upper, uint32_t lower) {
    uint32_t y = (upper & 0x80000000u) | (lower & 0x7FFFFFFFu);
    return (y >> 1) ^ ((lower & 1u) ? 0x9908B0DFu : 0u);
}

static void mt_twist(uint32_t *mt) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) mt[i] = mt[i + MT_M] ^ mt_mix(mt[i], mt[i + 1]);
    for (; i < MT_N - 1; i++) mt[i] = mt[i + MT_M - MT_N] ^ mt_mix(mt[i], mt[i + 1]); /* reads 227 back: vectorizes */
    mt[MT_N - 1] = mt[MT_M - 1] ^ mt_mix(mt[MT_N - 1], mt[0]);
}

void uniform_draws(uint64_t seed, int64_t n, float *out) {
    uint32_t mt[MT_N];
    mt[0] = (uint32_t)seed;
    for (uint32_t i = 1; i < MT_N; i++) mt[i] = 1812433253u * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i;
    for (int64_t done = 0; done < n; done += MT_N) {
        mt_twist(mt);
        int64_t m = n - done < MT_N ? n - done : MT_N;
        float *o = out + done;
        for (int64_t j = 0; j < m; j++) {
            uint32_t y = mt[j];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9D2C5680u;
            y ^= (y << 15) & 0xEFC60000u;
            y ^= y >> 18;
            o[j] = (float)(y & 0xFFFFFFu) * 0x1p-24f;
        }
    }
}
