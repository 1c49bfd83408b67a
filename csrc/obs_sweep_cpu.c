/* The OBS (SparseGPT) sweep of one column block, on the CPU: the column loop of
 * sparsellm.reference.obs_prune_block with the mask already chosen, in plain C.
 *
 * The reference runs this loop in PyTorch, about seven tensor operations per column, so on a
 * 2-core CPU it is bound by per-operation overhead (~100 us a column), not by arithmetic. Here
 * it is one call per block. Compiled on first use by sparsellm/_cpu_backend.py with the
 * system C compiler and loaded with ctypes: plain C with no Python or torch headers, so the
 * compile takes a fraction of a second (the torch extension headers take about a minute).
 *
 * Same arithmetic as the reference, operation for operation, so the results are equal to it
 * bit for bit where torch's rank-1 update rounds the product before subtracting it (MKL on
 * x86-64: checked by tests/test_cpu_backend.py); it must be compiled with -ffp-contract=off,
 * which keeps the compiler from fusing a multiply and a subtract into one rounding.
 *
 * Layout, as in the reference: the block transposed, one row per column of the weight
 * (work_t, mask_t, err_t: width x rows, row-major), so the update of one column spreads
 * contiguous rows of weights. Rows (weight rows) are independent: [row_begin, row_end) is the
 * caller's share (it splits a block among threads), walked in tiles of TILE weight rows that
 * keep the block's working set in the first-level cache.
 */
#include <stdint.h>

#define TILE 64

void sparsellm_obs_sweep_f32(float *restrict work_t, const uint8_t *restrict mask_t,
                             const float *restrict hinv, int64_t hinv_stride,
                             float *restrict err_t, float *restrict losses,
                             int64_t rows, int64_t width, int64_t row_begin, int64_t row_end)
{
    for (int64_t tile = row_begin; tile < row_end; tile += TILE) {
        const int64_t n = row_end - tile < TILE ? row_end - tile : TILE;
        float loss[TILE];
        for (int64_t i = 0; i < n; ++i)
            loss[i] = 0.0f;
        for (int64_t col = 0; col < width; ++col) {
            const float *h = hinv + col * hinv_stride; /* row col of the upper factor */
            float *restrict w = work_t + col * rows + tile;
            const uint8_t *restrict m = mask_t + col * rows + tile;
            float *restrict e = err_t + col * rows + tile;
            const float d = h[col];
            for (int64_t i = 0; i < n; ++i) {
                const float q = m[i] ? 0.0f : w[i];    /* the kept (or pruned) weight */
                const float ei = (w[i] - q) / d;       /* its error, scaled by the factor */
                const float sq = ei * ei;
                loss[i] = loss[i] + sq;
                e[i] = ei;
                w[i] = q;
            }
            for (int64_t k = col + 1; k < width; ++k) { /* spread the error to the later columns */
                const float hk = h[k];
                float *restrict wk = work_t + k * rows + tile;
                for (int64_t i = 0; i < n; ++i) {
                    const float t = hk * e[i];
                    wk[i] = wk[i] - t;
                }
            }
        }
        for (int64_t i = 0; i < n; ++i)
            losses[tile + i] = loss[i];
    }
}
