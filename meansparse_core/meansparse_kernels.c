/* The MeanSparse operator as one pass over memory, optionally with the ReLU that follows it.
 *
 * Built by native.py with the system C compiler (no -ffast-math: every operation rounds as
 * PyTorch's eager operations do, so results are bit-identical to theirs; -fno-trapping-math only
 * lets the compiler vectorise the comparisons, since nothing here reads floating-point traps). Features arrive as
 * contiguous rows (A, C, B), channels in the middle (fusion.as_rows).
 *
 *   y    = mean[c]  where |x - mean[c]| < band[c], else x        (the operator)
 *   out  = y < 0 ? 0 : y                                          (relu: PyTorch's, -0 and NaN kept)
 *   keep = which gradients pass, written when `keep` is not NULL:
 *          exact:            outside the band, and (with relu) !(out <= 0), as ReLU's backward tests
 *          straight-through: !(out <= 0) (with relu; without it nothing is masked and no mask is asked)
 */
#include <stdint.h>
#include <stdlib.h>

/* One loop per (dtype, relu, mask) so that each compiles to straight vector code without branches.
 * ELEMENT reads x[i] against the channel's m and b and writes out[i] (and keep[i]). */
#define ELEMENT(T, RELU, MASK, EXACT, i, m, b)                                                      \
    {                                                                                                \
        const T v = x[i], d = v - (m);                                                               \
        const int inside = (d < 0 ? -d : d) < (b);                                                   \
        T y = inside ? (m) : v;                                                                      \
        if (RELU) y = y < 0 ? (T)0 : y;                                                              \
        out[i] = y;                                                                                  \
        if (MASK) keep[i] = (uint8_t)((!(EXACT) | !inside) & (!(RELU) | !(y <= 0)));                 \
    }

/* Channels-last rows are short (one position's channels): blocks of whole positions, long enough
 * to vectorise, run against the channel vectors repeated to the block's length. */
#define BLOCK 1024

#define LOOP(T, NAME, RELU, MASK, EXACT)                                                             \
    static void NAME(const T *x, const T *mean, const T *band, T *out, uint8_t *keep, int64_t rows,   \
                     int64_t channels, int64_t inner, int threads) {                                 \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                            \
        for (int64_t r = 0; r < rows * channels; r++) {                                              \
            const T m = mean[r % channels], b = band[r % channels];                                  \
            for (int64_t i = r * inner; i < (r + 1) * inner; i++) ELEMENT(T, RELU, MASK, EXACT, i, m, b) \
        }                                                                                            \
    }                                                                                                \
    static void NAME##_last(const T *x, const T *mean, const T *band, T *out, uint8_t *keep,         \
                            int64_t rows, int64_t channels, int threads) {                           \
        const int64_t per_block = channels < BLOCK ? BLOCK / channels : 1, span = per_block * channels; \
        T *tiled = malloc(2 * span * sizeof(T));                                                     \
        if (!tiled) { NAME(x, mean, band, out, keep, rows, channels, 1, threads); return; }          \
        for (int64_t j = 0; j < span; j++) {                                                         \
            tiled[j] = mean[j % channels];                                                           \
            tiled[span + j] = band[j % channels];                                                    \
        }                                                                                            \
        const T *tm = tiled, *tb = tiled + span;                                                     \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                            \
        for (int64_t first = 0; first < rows; first += per_block) {                                  \
            const int64_t start = first * channels;                                                  \
            const int64_t n = (first + per_block <= rows ? per_block : rows - first) * channels;     \
            for (int64_t j = 0; j < n; j++) ELEMENT(T, RELU, MASK, EXACT, start + j, tm[j], tb[j])   \
        }                                                                                            \
        free(tiled);                                                                                 \
    }

/* Entry point: inner == 1 is the channels-last layout, where channels vary fastest. */
#define DEFINE_KERNEL(T, NAME)                                                                       \
    LOOP(T, NAME##_plain, 0, 0, 0) LOOP(T, NAME##_relu, 1, 0, 0)                                     \
    LOOP(T, NAME##_exact, 0, 1, 1) LOOP(T, NAME##_relu_exact, 1, 1, 1)                               \
    LOOP(T, NAME##_relu_through, 1, 1, 0)                                                            \
    void NAME(const T *x, const T *mean, const T *band, T *out, uint8_t *keep, int64_t rows,         \
              int64_t channels, int64_t inner, int relu, int exact, int threads) {                   \
        void (*loop)(const T *, const T *, const T *, T *, uint8_t *, int64_t, int64_t, int64_t, int);\
        void (*last)(const T *, const T *, const T *, T *, uint8_t *, int64_t, int64_t, int);        \
        if (!keep) { loop = relu ? NAME##_relu : NAME##_plain; last = relu ? NAME##_relu_last : NAME##_plain_last; } \
        else if (exact) { loop = relu ? NAME##_relu_exact : NAME##_exact;                            \
                          last = relu ? NAME##_relu_exact_last : NAME##_exact_last; }                \
        else { loop = NAME##_relu_through; last = NAME##_relu_through_last; } /* needs relu */       \
        if (inner == 1) last(x, mean, band, out, keep, rows, channels, threads);                     \
        else loop(x, mean, band, out, keep, rows, channels, inner, threads);                         \
    }

/* The backward pass: the gradient where it passes, +0 elsewhere (what ReLU's backward gives). */
#define DEFINE_MASKED(T, NAME)                                                                       \
    void NAME(const T *grad, const uint8_t *keep, T *out, int64_t n, int threads) {                  \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                            \
        for (int64_t i = 0; i < n; i++) out[i] = keep[i] ? grad[i] : (T)0;                           \
    }

DEFINE_KERNEL(float, meansparse_f32)
DEFINE_KERNEL(double, meansparse_f64)
DEFINE_MASKED(float, meansparse_masked_f32)
DEFINE_MASKED(double, meansparse_masked_f64)

/* 1 when built with OpenMP (the loops run on several threads), 0 for a serial build. */
int meansparse_parallel(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
