// Tiled online-softmax attention for one (batch, head) pair on CPU: forward and backward.
// Torch-free and float32 only (the glue in attention_cpu.cpp upcasts bf16/fp16 inputs).
//
// NO include guard, on purpose: attention_cpu.cpp includes this file several times, each time
// inside its own namespace and under its own `#pragma GCC target` (SSE2, AVX2+FMA, AVX-512),
// with FASTLM_ATTN_VW set to the vector width in floats; it picks the widest version the CPU
// runs at run time. Every function here is therefore compiled once per instruction set, under a
// distinct name, so no inline function is shared between the versions. The includes this code
// needs (<algorithm>, <cmath>, <cstdint>, <cstring>, <limits>, <vector>) come before the
// first inclusion.
//
// Memory is linear in T: the forward keeps a (BR, D) output accumulator and a (BR, BC) score
// tile; the backward recomputes the scores tile by tile from q, k and the saved log-sum-exp.
// Every matrix product is one small GEMM (gemm_acc) register-blocked over GCC vector types, so
// the compiler emits the FMA of whatever instruction set the surrounding pragma enables. Softmax
// runs in base 2 (exp2 of scores premultiplied by log2(e)): one multiply fewer per score.

// GCC vector types: arithmetic with a scalar broadcasts it; comparisons give integer masks.
typedef float vf __attribute__((vector_size(FASTLM_ATTN_VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(FASTLM_ATTN_VW * sizeof(float))));
constexpr int VW = FASTLM_ATTN_VW;

constexpr int64_t BR = 64;  // queries per tile
constexpr int64_t BC = 64;  // keys per tile (a multiple of every VW)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

static inline vf loadu(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// Every lane x. Not `vf{} + x`: 0 + x is not x for x = -0, so gcc keeps a scalar add before
// the broadcast, in the GEMMs' inner loop.
static inline vf splat(float x) {
  vf v = {};
  v[0] = x;
  return __builtin_shuffle(v, vi{});  // lane 0 everywhere: one broadcast
}

// 2^x for x <= 0 (scores minus their running max), ~1 ulp: x = n + f with n an integer and
// |f| <= 1/2, 2^f by its degree-7 Taylor polynomial in f*ln2, 2^n added to the exponent bits.
// Below -126 the result would be subnormal: clamped there (~1e-38, far below float32's eps).
static inline vf exp2_nonpos(vf x) {
  x = x < splat(-126.0f) ? splat(-126.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x + magic;
  const vf n = t - magic;
  const vf f = (x - n) * kLn2;  // |f| <= ln2 / 2
  vf p = splat(1.0f / 5040);
  p = p * f + 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const vi ni = (vi)t - (vi)magic;  // bit patterns: t's mantissa holds n
  return (vf)((vi)p + (ni << 23));
}

static inline float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < VW; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
static inline float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < VW; ++l) s += v[l];
  return s;
}

// C (MR x NV*VW) += A (MR x K, row stride lda) * B (K x NV*VW, row stride ldb), with the MR x NV
// accumulators held in registers across the K loop. TA: A is stored transposed (K x MR, row
// stride lda), so P^T dO and dS^T Q need no transposed copy of P or dS.
template <int MR, int NV, bool TA>
static inline void micro(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                         float* C, int64_t ldc) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = loadu(C + r * ldc + v * VW);
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = loadu(B + k * ldb + v * VW);
    for (int r = 0; r < MR; ++r) {
      const vf a = splat(TA ? A[k * lda + r] : A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) storeu(C + r * ldc + v * VW, acc[r][v]);
}

// Rows [0, M) of C += A * B for one column block of NV vectors: MR rows at a time, then singles.
template <int MR, int NV, bool TA>
static inline void rows_block(int64_t M, int64_t K, const float* A, int64_t lda, const float* B,
                              int64_t ldb, float* C, int64_t ldc) {
  const int64_t row_step = TA ? 1 : lda;  // how far A's next row starts
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    micro<MR, NV, TA>(K, A + i * row_step, lda, B, ldb, C + i * ldc, ldc);
  for (int64_t r = i; r < M && r < i + MR - 1; ++r)  // the < MR rows left (the bound tells gcc)
    micro<1, NV, TA>(K, A + r * row_step, lda, B, ldb, C + r * ldc, ldc);
}

// C (M x N) += A (M x K) * B (K x N), all row-major with the given row strides (TA: A stored
// as its transpose, K x M).
// 32 columns per block with 4 rows is 4 x (32 / VW) accumulators: 8 AVX2 or SSE-pair registers,
// 8 AVX-512 registers at 64 columns. AVX-512 has 32 registers: a 32-column block (a head dim of
// 32 or 48) takes 8 rows, 16 accumulators, since 4 FMA chains of 4-cycle latency would leave
// half its FMA throughput unused. Columns past the last full vector are done in scalar.
template <bool TA = false>
static void gemm_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                     const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int NV = (VW >= 16 ? 64 : 32) / VW;
  int64_t j = 0;
  for (; j + NV * VW <= N; j += NV * VW)
    rows_block<4, NV, TA>(M, K, A, lda, B + j, ldb, C + j, ldc);
  if constexpr (VW >= 16)
    for (; j + 2 * VW <= N; j += 2 * VW)
      rows_block<8, 2, TA>(M, K, A, lda, B + j, ldb, C + j, ldc);
  for (; j + VW <= N; j += VW) rows_block<4, 1, TA>(M, K, A, lda, B + j, ldb, C + j, ldc);
  for (; j < N; ++j) {
    for (int64_t i = 0; i < M; ++i) {
      float s = C[i * ldc + j];
      for (int64_t k = 0; k < K; ++k) s += (TA ? A[k * lda + i] : A[i * lda + k]) * B[k * ldb + j];
      C[i * ldc + j] = s;
    }
  }
}

// dst (cols x rows, stride ld_dst) = src (rows x cols, stride ld_src) transposed.
static void transpose(int64_t rows, int64_t cols, const float* src, int64_t ld_src, float* dst,
                      int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// Keys query row i sees: [lo, hi). Queries are aligned bottom-right (query i sits at key
// position i + Tk - Tq), causal caps hi there, a window of w keys raises lo to position - w + 1.
struct Mask {
  int64_t Tq, Tk;
  bool causal;
  int64_t window;  // <= 0: none
  void range(int64_t i, int64_t* lo, int64_t* hi) const {
    const int64_t pos = i + Tk - Tq;
    *hi = causal ? std::min(Tk, std::max<int64_t>(0, pos + 1)) : Tk;
    *lo = window > 0 ? std::min(Tk, std::max<int64_t>(0, pos - window + 1)) : 0;
    if (*lo > *hi) *lo = *hi;
  }
};

// A (T, D) matrix whose rows are `ld` floats apart (ld >= D): a head of a (B, T, H, D) tensor,
// or of q, k or v viewed out of one fused qkv projection, is read in place, without a copy.
struct Rows {
  const float* p;
  int64_t ld;
  const float* row(int64_t i) const { return p + i * ld; }
};

// Rows [i0, i0 + rows) of a strided (T, D) matrix as a (tile, D) tile, its row stride in *ld:
// the matrix itself when the tile is full, else a zero-padded copy in `buf` with stride D
// (padding rows must be finite: they meet zeros of P).
static const float* tile_rows(Rows m, int64_t i0, int64_t rows, int64_t D, float* buf,
                              int64_t tile, int64_t* ld) {
  if (rows == tile) {
    *ld = m.ld;
    return m.row(i0);
  }
  for (int64_t r = 0; r < rows; ++r) std::memcpy(buf + r * D, m.row(i0 + r), sizeof(float) * D);
  std::memset(buf + rows * D, 0, sizeof(float) * (tile - rows) * D);
  *ld = D;
  return buf;
}

// Turns one (BR, BC) tile of raw scores q.k (rows [0, rows)) into base-2 log-probabilities'
// exponentials: p = 2^(s * c - sub[r]) inside each row's key range, 0 outside. Returns nothing;
// `sub` is the per-row offset (running max in the forward, log2-sum-exp in the backward).
// Key columns are tile-local: [lo[r], hi[r]) within [0, BC).
static inline void masked_exp2(float* s, const int64_t* lo, const int64_t* hi, int64_t rows,
                               float c, const float* sub) {
  vi iota;
  for (int l = 0; l < VW; ++l) iota[l] = l;
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = s + r * BC;
    const vi lov = vi{} + (int32_t)lo[r], hiv = vi{} + (int32_t)hi[r];
    const vf off = splat(sub[r]);
    for (int64_t j = 0; j < BC; j += VW) {
      const vi jv = iota + (int32_t)j;
      const vf p = exp2_nonpos(loadu(sr + j) * c - off);
      storeu(sr + j, ((jv >= lov) & (jv < hiv)) ? p : vf{});
    }
  }
}

// max over j in [lo, hi) of s[j] * c (-inf for an empty range), a vector at a time: a scalar
// max is a chain of dependent instructions, BC of them per row.
static inline float masked_row_max(const float* s, int64_t lo, int64_t hi, float c) {
  vi iota;
  for (int l = 0; l < VW; ++l) iota[l] = l;
  const vi lov = vi{} + (int32_t)lo, hiv = vi{} + (int32_t)hi;
  const vf ninf = splat(kNegInf);
  vf mx = ninf;
  for (int64_t j = 0; j < BC; j += VW) {
    const vi jv = iota + (int32_t)j;
    const vf x = loadu(s + j) * c;
    const vf keep = ((jv >= lov) & (jv < hiv)) ? x : ninf;
    mx = keep > mx ? keep : mx;
  }
  return hmax(mx);
}

// Causal tiles: a query row sees keys [tlo[r], thi[r]) of the tile, thi growing with the row,
// so the products over keys run per group of RG rows over the keys the group's last row sees
// (the rest of the tile is masked to 0 anyway); on the diagonal tile that skips ~3/8 of the work.
constexpr int64_t RG = 16;  // a multiple of every micro-kernel's row count

// Columns (keys) rows [0, r_last] need as a GEMM's N: thi[r_last] rounded up to whole vectors.
static inline int64_t group_cols(const int64_t* thi, int64_t r_last) {
  return std::min<int64_t>(BC, (thi[r_last] + VW - 1) / VW * VW);
}

// S (rows, BC) += A (rows, K) B (K, BC) with row group g only over its group_cols: q k^T, dO v^T.
static void gemm_keys_cols(int64_t rows, int64_t K, const float* A, int64_t lda, const float* B,
                           float* S, const int64_t* thi) {
  for (int64_t g = 0; g < rows; g += RG) {
    const int64_t gr = std::min(RG, rows - g);
    gemm_acc(gr, group_cols(thi, g + gr - 1), K, A + g * lda, lda, B, BC, S + g * BC, BC);
  }
}

// C (rows, N) += P (rows, BC) X (BC, N) with row group g only over the keys it sees: P v, dS k.
static void gemm_keys_inner(int64_t rows, int64_t N, const float* P, const float* X, int64_t ldx,
                            float* C, int64_t ldc, const int64_t* thi) {
  for (int64_t g = 0; g < rows; g += RG) {
    const int64_t gr = std::min(RG, rows - g);
    gemm_acc(gr, N, thi[g + gr - 1], P + g * BC, BC, X, ldx, C + g * ldc, ldc);
  }
}

// C (BC, N) += P^T (BC, rows) X (rows, N), key group by key group, each only over the rows that
// see one of its keys (those from the first row whose thi passes the group's first key): P^T dO,
// dS^T q.
static void gemm_keys_outer(int64_t rows, int64_t N, const float* P, const float* X, int64_t ldx,
                            float* C, int64_t ldc, const int64_t* thi) {
  int64_t k0 = 0;
  for (int64_t kg = 0; kg < BC; kg += RG) {
    while (k0 < rows && thi[k0] <= kg) ++k0;
    if (k0 == rows) break;
    gemm_acc<true>(RG, N, rows - k0, P + k0 * BC + kg, BC, X + k0 * ldx, ldx, C + kg * ldc, ldc);
  }
}

// Forward of one head. q (Tq, D), k and v (Tk, D) -> out (Tq, D), each with its own row stride,
// and lse (Tq,) natural-log log-sum-exp of the scaled scores (-inf, with out 0, for a query
// that sees no key).
static void forward_head(Rows q, Rows k, Rows v, float* out, int64_t ldo, float* lse, int64_t D,
                         float scale, const Mask& mask) {
  const int64_t Tq = mask.Tq, Tk = mask.Tk;
  const float c = scale * kLog2e;
  std::vector<float> qbuf(BR * D), kt(D * BC), vbuf(BC * D), s(BR * BC), acc(BR * D);
  int64_t lo[BR], hi[BR], tlo[BR], thi[BR];
  float m[BR], l[BR];
  for (int64_t i0 = 0; i0 < Tq; i0 += BR) {
    const int64_t rows = std::min(BR, Tq - i0);
    int64_t ldq, ldv;
    const float* qt = tile_rows(q, i0, rows, D, qbuf.data(), BR, &ldq);
    for (int64_t r = 0; r < rows; ++r) {
      mask.range(i0 + r, &lo[r], &hi[r]);
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    // lo and hi grow with the row, so the tile's keys are [lo of its first row, hi of its last).
    const int64_t j_begin = lo[0] / BC * BC, j_end = hi[rows - 1];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += BC) {
      const int64_t cols = std::min(BC, Tk - j0);
      transpose(cols, D, k.row(j0), k.ld, kt.data(), BC);
      for (int64_t d = 0; d < D; ++d)  // keys past Tk: zero (finite) scores, masked below
        std::fill(kt.data() + d * BC + cols, kt.data() + (d + 1) * BC, 0.f);
      const float* vt = tile_rows(v, j0, cols, D, vbuf.data(), BC, &ldv);

      for (int64_t r = 0; r < rows; ++r) {
        tlo[r] = std::clamp<int64_t>(lo[r] - j0, 0, BC);
        thi[r] = std::clamp<int64_t>(hi[r] - j0, 0, BC);
      }
      std::fill(s.begin(), s.end(), 0.f);
      gemm_keys_cols(rows, D, qt, ldq, kt.data(), s.data(), thi);  // (rows, BC) = q k^T
      // Online softmax: new running max, rescale what was accumulated under the old one.
      float sub[BR];
      for (int64_t r = 0; r < rows; ++r) {
        const float mx = masked_row_max(s.data() + r * BC, tlo[r], thi[r], c);
        const float m_new = std::max(m[r], mx);
        if (m_new != kNegInf && m_new != m[r]) {
          const float alpha = std::exp2(m[r] - m_new);  // 0 when m[r] is -inf
          l[r] *= alpha;
          for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
          m[r] = m_new;
        }
        sub[r] = m[r] == kNegInf ? 0.f : m[r];
      }
      masked_exp2(s.data(), tlo, thi, rows, c, sub);
      for (int64_t r = 0; r < rows; ++r) {
        vf sum = vf{};
        for (int64_t j = 0; j < BC; j += VW) sum += loadu(s.data() + r * BC + j);
        l[r] += hsum(sum);
      }
      gemm_keys_inner(rows, D, s.data(), vt, ldv, acc.data(), D, thi);  // (rows, D) += p v
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = l[r] > 0.f ? 1.0f / l[r] : 0.f;
      for (int64_t d = 0; d < D; ++d) out[(i0 + r) * ldo + d] = acc[r * D + d] * inv;
      lse[i0 + r] = l[r] > 0.f ? (m[r] + std::log2(l[r])) * kLn2 : kNegInf;
    }
  }
}

// Backward of one head: dq (Tq, D), dk and dv (Tk, D) of this head alone (the glue sums dk and dv
// over the query heads that share a key/value head), every matrix with its own row stride.
// Loops over key tiles outside, so the tile's dk and dv accumulate in place, and adds each
// query tile's share into dq.
//   P = exp(s - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
//   dQ = scale * dS K, dK = scale * dS^T Q.
static void backward_head(Rows q, Rows k, Rows v, Rows out, Rows dout, const float* lse,
                          float* dq, int64_t lddq, float* dk, int64_t lddk, float* dv,
                          int64_t lddv, int64_t D, float scale, const Mask& mask) {
  const int64_t Tq = mask.Tq, Tk = mask.Tk;
  const float c = scale * kLog2e;
  std::vector<float> delta(Tq), lse2(Tq), kt(D * BC), vt(D * BC), kbuf(BC * D), qbuf(BR * D),
      dobuf(BR * D), p(BR * BC), dp(BR * BC), dkt(BC * D), dvt(BC * D);
  std::vector<int64_t> lo(Tq), hi(Tq);
  for (int64_t i = 0; i < Tq; ++i) {
    const float* o = out.row(i);
    const float* g = dout.row(i);
    vf acc = vf{};
    int64_t d = 0;
    for (; d + VW <= D; d += VW) acc += loadu(g + d) * loadu(o + d);
    float sum = hsum(acc);
    for (; d < D; ++d) sum += g[d] * o[d];
    delta[i] = sum;
    lse2[i] = lse[i] * kLog2e;
    mask.range(i, &lo[i], &hi[i]);
    std::fill(dq + i * lddq, dq + i * lddq + D, 0.f);
  }
  int64_t tlo[BR], thi[BR];
  for (int64_t j0 = 0; j0 < Tk; j0 += BC) {
    const int64_t cols = std::min(BC, Tk - j0);
    transpose(cols, D, k.row(j0), k.ld, kt.data(), BC);
    transpose(cols, D, v.row(j0), v.ld, vt.data(), BC);
    for (int64_t d = 0; d < D; ++d) {
      std::fill(kt.data() + d * BC + cols, kt.data() + (d + 1) * BC, 0.f);
      std::fill(vt.data() + d * BC + cols, vt.data() + (d + 1) * BC, 0.f);
    }
    int64_t ldk, ldq, lddo;
    const float* kj = tile_rows(k, j0, cols, D, kbuf.data(), BC, &ldk);
    std::fill(dkt.begin(), dkt.end(), 0.f);
    std::fill(dvt.begin(), dvt.end(), 0.f);
    for (int64_t i0 = 0; i0 < Tq; i0 += BR) {
      const int64_t rows = std::min(BR, Tq - i0);
      if (hi[i0 + rows - 1] <= j0 || lo[i0] >= j0 + cols) continue;  // no row sees these keys
      const float* qi = tile_rows(q, i0, rows, D, qbuf.data(), BR, &ldq);
      const float* doi = tile_rows(dout, i0, rows, D, dobuf.data(), BR, &lddo);
      for (int64_t r = 0; r < rows; ++r) {
        tlo[r] = std::clamp<int64_t>(lo[i0 + r] - j0, 0, BC);
        thi[r] = std::clamp<int64_t>(hi[i0 + r] - j0, 0, BC);
      }
      std::fill(p.begin(), p.end(), 0.f);
      gemm_keys_cols(rows, D, qi, ldq, kt.data(), p.data(), thi);  // raw scores q k^T
      masked_exp2(p.data(), tlo, thi, rows, c, lse2.data() + i0);  // P
      gemm_keys_outer(rows, D, p.data(), doi, lddo, dvt.data(), D, thi);  // dV += P^T dO
      std::fill(dp.begin(), dp.end(), 0.f);
      gemm_keys_cols(rows, D, doi, lddo, vt.data(), dp.data(), thi);  // dP = dO V^T
      for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta), into dp
        const vf dl = splat(delta[i0 + r]);
        for (int64_t j = 0; j < BC; j += VW) {
          float* x = dp.data() + r * BC + j;
          storeu(x, loadu(p.data() + r * BC + j) * (loadu(x) - dl));
        }
      }
      gemm_keys_inner(rows, D, dp.data(), kj, ldk, dq + i0 * lddq, lddq, thi);  // dQ += dS K
      gemm_keys_outer(rows, D, dp.data(), qi, ldq, dkt.data(), D, thi);  // dK += dS^T Q
    }
    for (int64_t j = 0; j < cols; ++j) {
      for (int64_t d = 0; d < D; ++d) {
        dk[(j0 + j) * lddk + d] = dkt[j * D + d] * scale;
        dv[(j0 + j) * lddv + d] = dvt[j * D + d];
      }
    }
  }
  for (int64_t i = 0; i < Tq; ++i)
    for (int64_t d = 0; d < D; ++d) dq[i * lddq + d] *= scale;
}
