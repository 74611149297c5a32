/* gradkit's optional CPU kernels: single passes over float32 buffers that PyTorch's eager ops make in several.
 * Built on first use by gradkit/_native.py (a C compiler, no PyTorch headers) and called through ctypes.
 * Every kernel has a PyTorch equivalent in the module that calls it; the tests compare the two.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>

/* DGC momentum correction and accumulation, fused with the row maxima of the blockwise top-k:
 *   mode 0: u <- g + m u; v <- v + u           (momentum correction)
 *   mode 1: u <- g;       v <- v + g           (m = 0)
 *   mode 2: u <- m (u + g); v <- v + u + g     (Nesterov)
 * and rowmax[r] = max |v[r c : (r + 1) c]| over rows of c entries (the last row holds the n % c tail).
 * Work goes in chunks of whole rows that stay in the L1 cache: the update streams through a chunk, then
 * the maxima read it back from cache. */
#define GK_CHUNK 4096

static void gk_dgc_chunk(const float *restrict g, float *restrict u, float *restrict v, int64_t len, float m,
                         int mode) {
    if (mode == 0) {
        for (int64_t i = 0; i < len; ++i) {
            float ui = g[i] + m * u[i];
            u[i] = ui;
            v[i] = v[i] + ui;
        }
    } else if (mode == 1) {
        for (int64_t i = 0; i < len; ++i) {
            u[i] = g[i];
            v[i] = v[i] + g[i];
        }
    } else {
        for (int64_t i = 0; i < len; ++i) {
            float ui = m * (u[i] + g[i]);
            u[i] = ui;
            v[i] = (v[i] + ui) + g[i];
        }
    }
}

/* max |x[0:len]|: the largest of the sign-cleared bit patterns, which order as the magnitudes do, a NaN's
 * above inf's (an integer maximum, which the compiler vectorises; a float one it would keep scalar) */
static float gk_absmax(const float *restrict x, int64_t len) {
    uint32_t mx = 0;
    for (int64_t i = 0; i < len; ++i) {
        uint32_t bits;
        memcpy(&bits, x + i, sizeof bits);
        bits &= 0x7fffffffu;
        mx = bits > mx ? bits : mx;
    }
    float out;
    memcpy(&out, &mx, sizeof out);
    return out;
}

void gk_dgc_update(const float *g, float *u, float *v, int64_t n, float m, int mode, int64_t c, float *rowmax) {
    int64_t chunk = GK_CHUNK / c > 0 ? GK_CHUNK / c * c : c;
    for (int64_t a = 0; a < n; a += chunk) {
        int64_t len = a + chunk < n ? chunk : n - a;
        gk_dgc_chunk(g + a, u + a, v + a, len, m, mode);
        for (int64_t r = 0; r < len; r += c)
            rowmax[(a + r) / c] = gk_absmax(v + a + r, r + c < len ? c : len - r);
    }
}

/* The magnitude's bit pattern: for floats of any sign these order as |x| does, NaN above inf. */
static inline uint32_t gk_mag(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b & 0x7fffffffu;
}

/* The k-th largest magnitude (as bits) of x[0:m] (1 <= k <= m) by a three-digit radix selection; *greater
 * gets how many entries lie strictly above it. */
static uint32_t gk_kth_largest(const float *x, int64_t m, int64_t k, int64_t *greater) {
    static const int shift[3] = {21, 10, 0}, width[3] = {11, 11, 10};
    int64_t hist[2048];
    uint32_t prefix = 0, mask = 0;
    int64_t need = k, above = 0;
    for (int p = 0; p < 3; ++p) {
        uint32_t dm = (1u << width[p]) - 1;
        memset(hist, 0, sizeof(int64_t) << width[p]);
        for (int64_t i = 0; i < m; ++i) {
            uint32_t b = gk_mag(x[i]);
            if ((b & mask) == prefix)
                hist[(b >> shift[p]) & dm]++;
        }
        uint32_t d = dm;
        int64_t cum = 0;
        while (d > 0 && cum + hist[d] < need)  /* the entries with this prefix number >= need */
            cum += hist[d--];
        need -= cum;
        above += cum;
        prefix |= d << shift[p];
        mask |= dm << shift[p];
    }
    *greater = above;
    return prefix;
}

/* The blockwise exact top-k of |v| (v: n entries in rows of c, the last row may be short; rmax: the
 * nrows = ceil(n / c) row maxima of |v|; 1 <= k <= nrows). R = the k-th largest row maximum is at most the
 * k-th largest |v| T (the k rows above it hold k entries >= R), so a top-k set lies among the entries
 * >= R of the rows whose maximum is >= R: these candidates go to cand_val / cand_idx (room for cap), T is
 * selected among them, and the entries > T and the first ones equal to T make exactly k.
 * Writes their flat indices in increasing order to idx[0:k]; where vals is not NULL, their values to vals;
 * where zero is set, sets those entries of v (and of u when not NULL) to 0. Returns k, or minus the number
 * of candidates when that exceeds cap (then nothing is written or changed: call again with more room), or 0
 * when k is out of range or rmax is not the row maxima of v (fewer than k candidates). */
int64_t gk_dgc_topk(float *v, float *u, int64_t n, int64_t c, const float *rmax, int64_t k, float *cand_val,
                    int64_t *cand_idx, int64_t cap, int64_t *idx, float *vals, int zero) {
    int64_t nrows = (n + c - 1) / c, ignored, cnt = 0;
    if (k < 1 || k > nrows)
        return 0;
    uint32_t r = gk_kth_largest(rmax, nrows, k, &ignored);
    for (int64_t row = 0; row < nrows; ++row) {
        if (gk_mag(rmax[row]) < r)
            continue;
        int64_t a = row * c, b = a + c < n ? a + c : n;
        for (int64_t i = a; i < b; ++i) {
            if (gk_mag(v[i]) >= r) {
                if (cnt < cap) {
                    cand_val[cnt] = v[i];
                    cand_idx[cnt] = i;
                }
                ++cnt;
            }
        }
    }
    if (cnt > cap)
        return -cnt;
    if (cnt < k)
        return 0;
    int64_t greater;
    uint32_t t = gk_kth_largest(cand_val, cnt, k, &greater);
    int64_t ties = k - greater, j = 0;
    for (int64_t q = 0; q < cnt && j < k; ++q) {
        uint32_t b = gk_mag(cand_val[q]);
        if (b > t || (b == t && ties-- > 0)) {
            int64_t i = cand_idx[q];
            idx[j] = i;
            if (vals)
                vals[j] = cand_val[q];
            if (zero) {
                v[i] = 0.0f;
                if (u)
                    u[i] = 0.0f;
            }
            ++j;
        }
    }
    return k;
}

/* Block16 index code of sorted flat indices idx[0:k]: int32 counts per block of 65,536 entries, then the
 * low 16 bits of each index less 32,768 as int16 (out: 4 nblocks + 2 k bytes). Returns 0, or -1 (out
 * unspecified) when an index lies outside the nblocks blocks. */
int gk_encode_block16(const int64_t *idx, int64_t k, int64_t nblocks, uint8_t *out) {
    int32_t *counts = (int32_t *)out;  /* out comes from an allocator aligned for any scalar */
    int16_t *low = (int16_t *)(out + 4 * nblocks);
    memset(counts, 0, 4 * (size_t)nblocks);
    for (int64_t j = 0; j < k; ++j) {
        int64_t blk = idx[j] >> 16;
        if (idx[j] < 0 || blk >= nblocks)
            return -1;
        counts[blk]++;
        low[j] = (int16_t)((idx[j] & 0xffff) - 0x8000);
    }
    return 0;
}

/* 1 when x[0:n] holds no NaN or inf: its largest magnitude bit pattern lies below inf's (NaN's lie above). */
int gk_all_finite(const float *x, int64_t n) {
    return gk_mag(gk_absmax(x, n)) < 0x7f800000u;
}

/* Rows of at most GK_SPAN entries (A x G x R with G R <= GK_SPAN) are handled with per-entry group
 * constants, so the inner loops run over whole rows however short each group's run R is. */
#define GK_SPAN 4096

/* An order-preserving map from a float's bits to int32 (an involution): integer minima and maxima
 * vectorise where float ones, which must respect NaN, stay scalar. A NaN maps beyond +-inf. */
static inline int32_t gk_key(float f) {
    int32_t b;
    memcpy(&b, &f, sizeof b);
    return b ^ (int32_t)((uint32_t)(b >> 31) >> 1);
}

static inline float gk_unkey(int32_t k) {
    int32_t b = k ^ (int32_t)((uint32_t)(k >> 31) >> 1);
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

/* Per-group minimum and maximum of x viewed as (A, G, R) (contiguous, A G R > 0): lo[G], hi[G]. */
void gk_group_minmax(const float *x, int64_t A, int64_t G, int64_t R, float *lo, float *hi) {
    int64_t w = G * R;
    if (w <= GK_SPAN) {
        int32_t l[GK_SPAN], h[GK_SPAN];
        for (int64_t j = 0; j < w; ++j) {
            l[j] = INT32_MAX;
            h[j] = INT32_MIN;
        }
        for (int64_t a = 0; a < A; ++a) {
            const float *p = x + a * w;
            for (int64_t j = 0; j < w; ++j) {
                int32_t k = gk_key(p[j]);
                l[j] = k < l[j] ? k : l[j];
                h[j] = k > h[j] ? k : h[j];
            }
        }
        for (int64_t gi = 0; gi < G; ++gi) {
            int32_t lk = INT32_MAX, hk = INT32_MIN;
            for (int64_t i = gi * R; i < (gi + 1) * R; ++i) {
                lk = l[i] < lk ? l[i] : lk;
                hk = h[i] > hk ? h[i] : hk;
            }
            lo[gi] = gk_unkey(lk);
            hi[gi] = gk_unkey(hk);
        }
        return;
    }
    for (int64_t gi = 0; gi < G; ++gi) {
        int32_t lk = INT32_MAX, hk = INT32_MIN;
        for (int64_t a = 0; a < A; ++a) {
            const float *p = x + (a * G + gi) * R;
            for (int64_t i = 0; i < R; ++i) {
                int32_t k = gk_key(p[i]);
                lk = k < lk ? k : lk;
                hk = k > hk ? k : hk;
            }
        }
        lo[gi] = gk_unkey(lk);
        hi[gi] = gk_unkey(hk);
    }
}

/* A counter-based uniform draw in [0, 1) with 24 random bits: a 32-bit integer hash (a bijection) of the
 * element's index, offset by one half of the call's 64-bit key and masked by the other. Over keys each draw
 * is uniform; no state is carried between elements, so the loops vectorise. */
static inline uint32_t gk_hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline float gk_uniform(uint32_t i, uint32_t key_lo, uint32_t key_hi) {
    return (float)((gk_hash32(i * 0x9e3779b9U + key_lo) ^ key_hi) >> 8) * (1.0f / 16777216.0f);
}

/* y = (x - b) s + u, clamped to [0, levels] and truncated (= floor there) to a code; NaN gives 0 */
static inline uint8_t gk_code(float x, float s, float b, float u, float levels) {
    float y = (x - b) * s + u;
    y = y >= 0.0f ? y : 0.0f;
    y = y <= levels ? y : levels;
    return (uint8_t)(int32_t)y;
}

/* The step of group g: levels / max(|alpha_g|, eps) (scale, quantising) or its inverse written as
 * max(|alpha_g|, eps) / levels (dequantising), each one correctly rounded division as in PyTorch. */
static inline float gk_step(float alpha, float levels, float eps, int inverse) {
    float a = fabsf(alpha);
    a = a > eps ? a : eps;
    return inverse ? a / levels : levels / a;
}

/* Per-entry copies of the group constants over one row of G R entries (ce: step, be: beta). */
static void gk_row_consts(const float *alpha, const float *beta, int64_t G, int64_t R, float levels, float eps,
                          int inverse, float *ce, float *be) {
    for (int64_t gi = 0; gi < G; ++gi) {
        float cg = gk_step(alpha[gi], levels, eps, inverse);
        for (int64_t i = gi * R; i < (gi + 1) * R; ++i) {
            ce[i] = cg;
            be[i] = beta[gi];
        }
    }
}

/* Mesa's codes of x viewed as (A, G, R): q = clamp(floor((x - beta_g) s_g + u), 0, levels) with
 * s_g = levels / max(|alpha_g|, eps) and u the draw above (stochastic) or 1/2 (round to nearest), stored as
 * uint8 (levels <= 255). */
void gk_quantize_u8(const float *x, uint8_t *q, int64_t A, int64_t G, int64_t R, const float *alpha,
                    const float *beta, float levels, float eps, uint64_t seed, int stochastic) {
    uint32_t klo = (uint32_t)seed, khi = (uint32_t)(seed >> 32);
    int64_t w = G * R;
    if (w <= GK_SPAN) {
        float se[GK_SPAN], be[GK_SPAN];
        gk_row_consts(alpha, beta, G, R, levels, eps, 0, se, be);
        for (int64_t a = 0; a < A; ++a) {
            const float *p = x + a * w;
            uint8_t *o = q + a * w;
            uint32_t base = (uint32_t)(a * w);
            if (stochastic) {
                for (int64_t j = 0; j < w; ++j)
                    o[j] = gk_code(p[j], se[j], be[j], gk_uniform(base + (uint32_t)j, klo, khi), levels);
            } else {
                for (int64_t j = 0; j < w; ++j)
                    o[j] = gk_code(p[j], se[j], be[j], 0.5f, levels);
            }
        }
        return;
    }
    for (int64_t a = 0; a < A; ++a) {
        for (int64_t gi = 0; gi < G; ++gi) {
            int64_t off = (a * G + gi) * R;
            const float *p = x + off;
            uint8_t *o = q + off;
            float sg = gk_step(alpha[gi], levels, eps, 0), bg = beta[gi];
            if (stochastic) {
                for (int64_t i = 0; i < R; ++i)
                    o[i] = gk_code(p[i], sg, bg, gk_uniform((uint32_t)(off + i), klo, khi), levels);
            } else {
                for (int64_t i = 0; i < R; ++i)
                    o[i] = gk_code(p[i], sg, bg, 0.5f, levels);
            }
        }
    }
}

/* One training-time pack of Mesa's activation quantiser: when `update` or not yet `*init`, the per-group
 * range (max - min, min) of x updates the running (alpha, beta) (copied on the first call, else
 * alpha <- lam alpha + (1 - lam) range, likewise beta) and sets *init; then (alpha, beta) are copied to
 * (alpha_out, beta_out), the snapshot the codes are made with (gk_quantize_u8). */
void gk_pack_u8(const float *x, uint8_t *q, int64_t A, int64_t G, int64_t R, float *alpha, float *beta,
                uint8_t *init, int update, float lam, float *alpha_out, float *beta_out, float levels, float eps,
                uint64_t seed, int stochastic) {
    if (update || !*init) {
        gk_group_minmax(x, A, G, R, beta_out, alpha_out); /* scratch: lo, hi */
        for (int64_t gi = 0; gi < G; ++gi) {
            float r = alpha_out[gi] - beta_out[gi], m = beta_out[gi];
            if (*init) {
                alpha[gi] = alpha[gi] * lam + (1.0f - lam) * r;
                beta[gi] = beta[gi] * lam + (1.0f - lam) * m;
            } else {
                alpha[gi] = r;
                beta[gi] = m;
            }
        }
        *init = 1;
    }
    memcpy(alpha_out, alpha, (size_t)G * sizeof(float));
    memcpy(beta_out, beta, (size_t)G * sizeof(float));
    gk_quantize_u8(x, q, A, G, R, alpha_out, beta_out, levels, eps, seed, stochastic);
}

/* Inverse of gk_quantize_u8: out = q max(|alpha_g|, eps) / levels + beta_g. */
void gk_dequantize_u8(const uint8_t *q, float *out, int64_t A, int64_t G, int64_t R, const float *alpha,
                      const float *beta, float levels, float eps) {
    int64_t w = G * R;
    if (w <= GK_SPAN) {
        float ce[GK_SPAN], be[GK_SPAN];
        gk_row_consts(alpha, beta, G, R, levels, eps, 1, ce, be);
        for (int64_t a = 0; a < A; ++a) {
            const uint8_t *p = q + a * w;
            float *o = out + a * w;
            for (int64_t j = 0; j < w; ++j)
                o[j] = (float)p[j] * ce[j] + be[j];
        }
        return;
    }
    for (int64_t a = 0; a < A; ++a) {
        for (int64_t gi = 0; gi < G; ++gi) {
            int64_t off = (a * G + gi) * R;
            const uint8_t *p = q + off;
            float *o = out + off;
            float cg = gk_step(alpha[gi], levels, eps, 1), bg = beta[gi];
            for (int64_t i = 0; i < R; ++i)
                o[i] = (float)p[i] * cg + bg;
        }
    }
}

/* Reconstruction drift at probed entries: max_i |x[idx[i]] - ref[i]| / max(max_i |ref[i]|, FLT_MIN), NaN
 * when either side holds a NaN (a reversible chain's check of its rebuilt input, see gradkit.functional). */
double gk_probe_drift(const float *x, const int64_t *idx, const float *ref, int64_t p) {
    float num = 0.0f, den = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < p; ++i) {
        float d = fabsf(x[idx[i]] - ref[i]), r = fabsf(ref[i]);
        nan |= (d != d) | (r != r);
        num = d > num ? d : num;
        den = r > den ? r : den;
    }
    if (nan)
        return NAN;
    return (double)num / (den > 1.17549435e-38f ? (double)den : 1.17549435e-38);
}

/* The k-th largest of m unsigned keys (1 <= k <= m) by a radix selection over four 8-bit digits (the first over
 * all keys, the next ones over those that share the digits found so far, compacted into work: m words; two
 * 1 kB histograms, so that runs of one digit do not chain their increments), finished by an insertion sort
 * once at most 32 keys are left; *need: how many keys equal to it belong to the k largest. */
static uint32_t gk_kth_key(const uint32_t *keys, int64_t m, int64_t k, uint32_t *work, int64_t *need) {
    int32_t hist[2][256];
    const uint32_t *src = keys;
    uint32_t prefix = 0, mask = 0;  /* the digits found so far, and their bits */
    for (int shift = 24; shift >= 0 && m > 32; shift -= 8) {
        memset(hist, 0, sizeof hist);
        uint32_t top = 0;
        int64_t i = 0;
        for (; i + 2 <= m; i += 2) {
            uint32_t a = (src[i] >> shift) & 255u, b = (src[i + 1] >> shift) & 255u;
            hist[0][a]++;
            hist[1][b]++;
            top = a > top ? a : top;
            top = b > top ? b : top;
        }
        if (i < m) {
            uint32_t a = (src[i] >> shift) & 255u;
            hist[0][a]++;
            top = a > top ? a : top;
        }
        uint32_t d = top;
        int64_t cum = 0;
        while (d > 0 && cum + hist[0][d] + hist[1][d] < k) {
            cum += hist[0][d] + hist[1][d];
            --d;
        }
        k -= cum;
        prefix |= d << shift;
        mask |= 255u << shift;
        int64_t c = 0;  /* keep the keys with this digit */
        for (i = 0; i < m; ++i) {
            work[c] = src[i];
            c += ((src[i] >> shift) & 255u) == d;
        }
        src = work;
        m = c;
    }
    if (mask != 0xffffffffu) {  /* at most 32 keys share the digits found: sort them, largest first */
        uint32_t v[32];
        int64_t n = 0;
        for (int64_t i = 0; i < m; ++i) {
            uint32_t x = src[i];
            int64_t p = n++;
            for (; p > 0 && v[p - 1] < x; --p)
                v[p] = v[p - 1];
            v[p] = x;
        }
        prefix = v[k - 1];
        int64_t above = 0;
        while (v[above] > prefix)
            ++above;
        k -= above;
    }
    *need = k;
    return prefix;
}

static inline uint32_t gk_ukey(float f) {
    return (uint32_t)gk_key(f) ^ 0x80000000u;
}

/* The k largest entries of row (n of them, 1 <= k <= n), by value: their column indices in increasing order
 * to o. Where k <= n / 4 a threshold keeps about 2 to 2.5 k candidates in one pass, and the selection runs on
 * them: on rows of 2048 entries or more the r-th largest of a strided sample of 256 (r well above the expected
 * k 256 / n), on shorter rows (64 or more) the row's mean plus the normal quantile of 2 k / n standard
 * deviations. When fewer than k pass (rare: a row ordered against the sample, or far from normal), the
 * selection runs on the whole row. scratch: 3 n words. */
static void gk_row_topk(const float *row, int64_t n, int64_t k, uint32_t *scratch, int64_t *o) {
    uint32_t *keys = scratch, *cols = scratch + n, *work = scratch + 2 * n;
    int64_t m = 0;
    if (n >= 64 && 4 * k <= n) {
        uint32_t thr;
        if (n >= 2048) {
            const int64_t ns = 256;
            double expect = (double)k * ns / (double)n;
            int64_t r = (int64_t)(expect + 4.0 * sqrt(expect) + 8.0), unused;
            for (int64_t t = 0; t < ns; ++t)
                keys[t] = gk_ukey(row[t * n / ns]);
            thr = gk_kth_key(keys, ns, r < ns ? r : ns, work, &unused);
        } else {  /* short rows: the row's mean plus z standard deviations, z the normal quantile of twice the
                   * kept fraction (Abramowitz-Stegun 26.2.23); rows far from normal fall back below */
            float lane[8] = {0}, lane2[8] = {0};
            int64_t c = 0;
            for (; c + 8 <= n; c += 8)
                for (int l = 0; l < 8; ++l) {
                    lane[l] += row[c + l];
                    lane2[l] += row[c + l] * row[c + l];
                }
            double sum = 0.0, sum2 = 0.0;
            for (int l = 0; l < 8; ++l) {
                sum += lane[l];
                sum2 += lane2[l];
            }
            for (; c < n; ++c) {
                sum += row[c];
                sum2 += (double)row[c] * row[c];
            }
            double mean = sum / n, var = sum2 / n - mean * mean, p = 2.0 * (double)k / (double)n;
            double t = sqrt(-2.0 * log(p < 0.5 ? p : 0.5));
            double z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) /
                           (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t);
            thr = gk_ukey((float)(mean + z * sqrt(var > 0.0 ? var : 0.0)));
        }
        for (int64_t c = 0; c < n; ++c) {
            uint32_t kv = gk_ukey(row[c]);
            keys[m] = kv;
            cols[m] = (uint32_t)c;
            m += kv >= thr;
        }
    }
    if (m < k) {  /* no sample, or too few above its threshold: the whole row */
        for (int64_t c = 0; c < n; ++c) {
            keys[c] = gk_ukey(row[c]);
            cols[c] = (uint32_t)c;
        }
        m = n;
    }
    int64_t need;
    uint32_t kth = gk_kth_key(keys, m, k, work, &need);
    /* the entries above the k-th largest and the first ones equal to it make k (NaN ranks above inf, as in
     * torch.topk) */
    if (4 * k >= m) {  /* many of the entries kept, scattered: without branches */
        for (int64_t c = 0, got = 0; c < m && got < k; ++c) {
            uint32_t kv = keys[c];
            int64_t tie = (kv == kth) & (need > 0);
            o[got] = cols[c];
            got += (kv > kth) | tie;
            need -= tie;
        }
    } else {
        for (int64_t c = 0, got = 0; c < m && got < k; ++c) {
            uint32_t kv = keys[c];
            if (kv > kth || (kv == kth && need-- > 0))
                o[got++] = cols[c];
        }
    }
}

/* The k largest entries of each row of x (rows x n, contiguous; rows of fewer than 2^31 entries): see
 * gk_row_topk; out: rows x k; scratch: 3 n words. */
void gk_rows_topk(const float *x, int64_t rows, int64_t n, int64_t k, uint32_t *scratch, int64_t *out) {
    for (int64_t r = 0; r < rows; ++r)
        gk_row_topk(x + r * n, n, k, scratch, out + r * k);
}

/* ||w a + (1 - w) b|| for rows a, b of d floats */
static inline float gk_pair_norm(const float *a, const float *b, float w, int64_t d) {
    float lane[8] = {0};
    int64_t c = 0;
    for (; c + 8 <= d; c += 8)  /* eight partial sums: the compiler vectorises them */
        for (int l = 0; l < 8; ++l) {
            float v = b[c + l] + w * (a[c + l] - b[c + l]);
            lane[l] += v * v;
        }
    float acc = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; c < d; ++c) {
        float v = b[c] + w * (a[c] - b[c]);
        acc += v * v;
    }
    return sqrtf(acc);
}

static inline void gk_prefetch_row(const float *row, int64_t d) {
    for (int64_t off = 0; off < d * (int64_t)sizeof(float); off += 64)
        __builtin_prefetch((const char *)row + off);
}

static float gk_dot(const float *a, const float *b, int64_t d) {
    float lane[8] = {0};
    int64_t c = 0;
    for (; c + 8 <= d; c += 8)
        for (int l = 0; l < 8; ++l)
            lane[l] += a[c + l] * b[c + l];
    float acc = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; c < d; ++c)
        acc += a[c] * b[c];
    return acc;
}

/* MoCHi's synthetic logits of one query without the synthetic vectors (see gradkit.functional.queue_info_nce):
 * row: its similarities q.n to the K keys (K x d), qb: the query (d), s type-1 mixes of keys i, j with weights
 * alpha and s2 type-2 mixes of q with keys j2 with weights beta:
 *   out = (alpha c_i + (1 - alpha) c_j) / ||alpha n_i + (1 - alpha) n_j||
 *   out = (beta q.q + (1 - beta) c_j2) / ||beta q + (1 - beta) n_j2||
 * each norm floored at 1e-12; the norms go to nm (s + s2, as out). */
static void gk_mix_row(const float *row, const float *keys, int64_t d, const float *qb, const int64_t *i,
                       const int64_t *j, const float *alpha, int64_t s, const int64_t *j2, const float *beta,
                       int64_t s2, float *o, float *nm) {
    float qq = gk_dot(qb, qb, d);
    for (int64_t t = 0; t < s; ++t) {
        int64_t ii = i[t], jj = j[t];
        if (t + 8 < s) {  /* the rows of the mix eight ahead, fetched while this one computes */
            gk_prefetch_row(keys + i[t + 8] * d, d);
            gk_prefetch_row(keys + j[t + 8] * d, d);
        }
        float a = alpha[t], n1 = gk_pair_norm(keys + ii * d, keys + jj * d, a, d);
        n1 = n1 > 1e-12f ? n1 : 1e-12f;
        o[t] = (a * row[ii] + (1.0f - a) * row[jj]) / n1;
        nm[t] = n1;
    }
    for (int64_t t = 0; t < s2; ++t) {
        int64_t jj = j2[t];
        float bt = beta[t], c = row[jj], b2 = 1.0f - bt;
        const float *n = keys + jj * d;
        float sq = gk_dot(n, n, d);
        float v = bt * bt * qq + b2 * b2 * sq + 2.0f * bt * b2 * c;
        float n2 = sqrtf(v > 0.0f ? v : 0.0f);
        n2 = n2 > 1e-12f ? n2 : 1e-12f;
        o[s + t] = (bt * qq + b2 * c) / n2;
        nm[s + t] = n2;
    }
}

/* A draw of the counter-based stream (klo, khi) at counter c, as an index uniform in [0, n). */
static inline int64_t gk_pick(uint32_t c, uint32_t klo, uint32_t khi, int64_t n) {
    return (int64_t)(((uint64_t)(gk_hash32(c * 0x9e3779b9U + klo) ^ khi) * (uint64_t)n) >> 32);
}

/* e^x in float32 for x <= 0 (within 2 ulp; 0 below -87.3, where float32 leaves the normal range; NaN stays
 * NaN), branch-free so that loops over it vectorise: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor
 * polynomial of degree 7, 2^n from the exponent bits. */
static inline float gk_exp_neg(float x) {
    float t = x * 1.44269504f;
    t = t < -126.0f ? -126.0f : t;
    t = t > 0.0f ? 0.0f : t;
    float n = (t + 12582912.0f) - 12582912.0f;  /* t rounded to the nearest integer */
    float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float out = p * scale;
    return x < -87.3f ? 0.0f : out;
}

/* max(m, x[0:n] * a), NaN ignored (the exponentials that follow carry it): an integer maximum of the
 * order-preserving keys, which vectorises. */
static float gk_scaled_max(const float *x, int64_t n, float a, float m) {
    int32_t mx = gk_key(m);
    for (int64_t c = 0; c < n; ++c) {
        int32_t v = gk_key(x[c] * a);
        mx = v > mx ? v : mx;
    }
    return gk_unkey(mx);
}

/* sum e^(x[0:n] a - m) */
static float gk_scaled_expsum(const float *x, int64_t n, float a, float m) {
    float lane[8] = {0};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        for (int l = 0; l < 8; ++l)
            lane[l] += gk_exp_neg(x[c + l] * a - m);
    float acc = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; c < n; ++c)
        acc += gk_exp_neg(x[c] * a - m);
    return acc;
}

/* MoCo's InfoNCE over the logits [q_b.k_b, lneg_b, syn_b] * inv_tau of each query b (B of them; q, k: B x d, k
 * normalised here (its norm floored at 1e-12); lneg: B x K similarities to the keys (K x d)) with target 0:
 * pos[b] = q_b.k_b, lse[b] = the row's
 * log-sum-exp; the mean loss is returned. With s + s2 > 0, MoCHi's synthetic logits syn_b (B x (s + s2), their
 * norms to norm) come first, per query with its row of lneg in cache: its N hardest keys (gk_row_topk,
 * scratch: 3 K words; top: N), the draws from the counter-based stream keyed by seed and b (uniform with
 * replacement over the N: i, j (B x s), j2 (B x s2); alpha ~ U(0, 1) (B x s); beta ~ U(0, beta_max) (B x s2)),
 * and the logits (gk_mix_row). */
double gk_info_nce_fwd(const float *q, const float *k, int64_t d, const float *lneg, int64_t B, int64_t K,
                       const float *keys, int64_t N, int64_t s, int64_t s2, float beta_max, uint64_t seed,
                       uint32_t *scratch, int64_t *top, int64_t *i, int64_t *j, float *alpha, int64_t *j2,
                       float *beta, float *syn, float *norm, float inv_tau, float *pos, float *lse) {
    int64_t S = s + s2;
    uint32_t khi = (uint32_t)(seed >> 32), c0 = (uint32_t)s;
    double loss = 0.0;
    for (int64_t b = 0; b < B; ++b) {
        const float *row = lneg + b * K, *srow = syn + b * S;
        if (S > 0) {
            gk_row_topk(row, K, N, scratch, top);
            uint32_t klo = gk_hash32((uint32_t)b * 0x9e3779b9U + (uint32_t)seed);
            int64_t *ib = i + b * s, *jb = j + b * s, *j2b = j2 + b * s2;
            float *ab = alpha + b * s, *bb = beta + b * s2;
            for (int64_t t = 0; t < s; ++t) {
                ab[t] = gk_uniform((uint32_t)t, klo, khi);
                ib[t] = top[gk_pick(c0 + (uint32_t)t, klo, khi, N)];
                jb[t] = top[gk_pick(2 * c0 + (uint32_t)t, klo, khi, N)];
            }
            for (int64_t t = 0; t < s2; ++t) {
                j2b[t] = top[gk_pick(3 * c0 + (uint32_t)t, klo, khi, N)];
                bb[t] = beta_max * gk_uniform(3 * c0 + (uint32_t)(s2 + t), klo, khi);
            }
            gk_mix_row(row, keys, d, q + b * d, ib, jb, ab, s, j2b, bb, s2, syn + b * S, norm + b * S);
        }
        const float *kb = k + b * d;
        float kn = sqrtf(gk_dot(kb, kb, d));
        float p = gk_dot(q + b * d, kb, d) / (kn > 1e-12f ? kn : 1e-12f), zp = p * inv_tau;
        float m = gk_scaled_max(srow, S, inv_tau, gk_scaled_max(row, K, inv_tau, zp));
        float sum = gk_exp_neg(zp - m) + gk_scaled_expsum(row, K, inv_tau, m) + gk_scaled_expsum(srow, S, inv_tau, m);
        pos[b] = p;
        lse[b] = m + logf(sum);
        loss += (double)lse[b] - (double)zp;
    }
    return loss / (double)B;
}

/* The gradient of gk_info_nce_fwd's loss for upstream g (already divided by B): into G (B x K, written whole)
 * the gradient of lneg, plus the synthetic logits' gradient routed to the key columns they mix (type 1: s per
 * query, keys i, j, weights alpha; type 2: s2, key j2 weight 1 - beta; each divided by its mix's norm, the
 * norms held constant, see gk_mix_row; S = s + s2); into dq (B x d, written whole) the gradient through
 * the positive logit and the type-2 mixes' share of q (qd: q without grad). G @ keys is the rest of q's
 * gradient. */
void gk_info_nce_bwd(float g, const float *qd, const float *k, int64_t d, const float *pos, const float *lneg,
                     int64_t B, int64_t K, const float *syn, const float *norm, const float *lse, float inv_tau,
                     const int64_t *i, const int64_t *j, const float *alpha, int64_t s, const int64_t *j2,
                     const float *beta, int64_t s2, float *G, float *dq) {
    float sc = g * inv_tau;
    int64_t S = s + s2;
    for (int64_t b = 0; b < B; ++b) {
        const float *row = lneg + b * K, *srow = syn + b * S, *nm = norm + b * S;
        float *gr = G + b * K, m = lse[b];
        for (int64_t c = 0; c < K; ++c)
            gr[c] = sc * gk_exp_neg(row[c] * inv_tau - m);
        for (int64_t t = 0; t < s; ++t) {
            float w = sc * gk_exp_neg(srow[t] * inv_tau - m) / nm[t], a = alpha[b * s + t];
            gr[i[b * s + t]] += w * a;
            gr[j[b * s + t]] += w * (1.0f - a);
        }
        float qcoef = 0.0f;
        for (int64_t t = 0; t < s2; ++t) {
            float w = sc * gk_exp_neg(srow[s + t] * inv_tau - m) / nm[s + t], bt = beta[b * s2 + t];
            gr[j2[b * s2 + t]] += w * (1.0f - bt);
            qcoef += w * bt;
        }
        const float *qb = qd + b * d, *kb = k + b * d;
        float kn = sqrtf(gk_dot(kb, kb, d));
        float gp = sc * (gk_exp_neg(pos[b] * inv_tau - m) - 1.0f) / (kn > 1e-12f ? kn : 1e-12f);
        float *db = dq + b * d;
        for (int64_t c = 0; c < d; ++c)
            db[c] = gp * kb[c] + qcoef * qb[c];
    }
}
