// CPU kernels of the asft:: ops (schemas declared in asft_kernels/ops/schema.py).
//
// Symbols of docs/method.md, per anchored pair j:
//   A: (r, n) lora_A, B: (m, r) lora_B (fp64/fp32/bf16/fp16, contiguous)
//   U: (m, k) alignment basis, P = Uᵀ B (k, r), G = Bᵀ B (r, r), M = A Aᵀ (r, r)
//   Q_B = 2λ M (r, r), R_B = 2λ diag(w) P M (k, r), H = 2λ (G − Pᵀ diag(w) P) (r, r)
// Math ("acc") dtype: fp64 for fp64 params, fp32 otherwise.
//
// stats_pass(U, B, A) -> (P, G, M)
// fused_anchored_adamw_(...): one pass per pair
//   rows of B:     g = grad_B + B Q_B − U R_B, AdamW, P' += U[i]ᵀ B'[i], G' += B'[i]ᵀ B'[i]
//   columns of A:  g = grad_A + H A,           AdamW, M' += A'[:, c] A'[:, c]ᵀ
// each factor with its own AdamW hyperparameters (lr_A, ..., maximize_A; lr_B, ...),
// with P', G', M' accumulated from the values as stored (after rounding to the param dtype).
//
// Work decomposition. Every pair is cut into row blocks of B (kRowBlock rows) and column
// blocks of A (kColBlock columns); the cut depends only on the shapes. All blocks of all
// pairs form one task list, run by at::parallel_for workers that pull tasks from a shared
// counter (dynamic load balance across pairs of different sizes: one grouped launch per
// step). Each task writes its own partial statistics; the worker that finishes a pair's last
// block sums that pair's partials in block order. Every sum runs in an order fixed by the
// shapes, hence the results are bitwise identical for any thread count.
//
// Micro-kernels. A row block is processed in sub-tiles of kSubRows rows whose slice of U
// (kSubRows × k) stays in L1 between its two uses:
//   1. B_tile Q_B and −U_tile R_B (kSubRows × r each, kept apart so that g rounds as
//      (grad + B Q_B) − U R_B): register tiles of JT rows × NVC vectors of columns
//      (gemm_tile), B[i, d] / U[i, t] broadcast, rows of [Q_B; −R_B] loaded; for ranks of at
//      most half a vector (r ≤ 8 in fp32 with AVX-512), where a row of the result would
//      leave most lanes idle, −U_tile R_B runs as dot products along t instead (dot_rows:
//      rows of U and of −R_Bᵀ loaded as whole vectors, lanes reduced by a fixed tree);
//   2. AdamW on the tile (contiguous kSubRows·r elements of B and its moments), while the
//      next sub-tile's rows of U, B, gradient and moments are prefetched;
//   3. Pᵀ (r × k) += B'_tileᵀ U_tile and G += B'_tileᵀ B'_tile: register tiles of CT rows of
//      the statistic × TT vectors along k (panel_tile), B'[i, c] broadcast, U rows loaded.
// Vectors are ATen's at::vec::Vectorized<acc_t> at the width the compiler targets
// (-march=native: AVX-512 or AVX2); bf16/fp16 parameters are widened when a tile is loaded.

// at::vec picks its vector width from these macros (ATen's own build sets them per
// dispatch target); set them from what the compiler may emit, before any ATen header.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
// the inline namespace of at::vec: distinct from ATen's own (DEFAULT, AVX2, AVX512)
#define CPU_CAPABILITY asft_native

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace asft {
namespace {

constexpr int64_t kSubRows = 24;             // rows of B (and U) per sub-tile: whole register tiles
constexpr int64_t kRowBlock = 10 * kSubRows;  // rows of B per task
constexpr int64_t kColBlock = 1024;  // columns of A per task (whole vectors; long rows for the prefetchers)

template <typename T>
using Vec = at::vec::Vectorized<T>;

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRegisters = 32;  // vector registers the tiles may fill
#else
constexpr int kRegisters = 16;
#endif
// gemm_tile: JT rows × NVC vectors of accumulators, NVC weights and one broadcast live
constexpr int kMaxNVC = 4;
// (the largest divisor of kSubRows that fits the registers)
constexpr int rows_per_tile(int nvc) {
  const int fit = (kRegisters - 2 - nvc) / nvc;
  return fit >= 8 ? 8 : fit >= 6 ? 6 : fit >= 4 ? 4 : fit >= 3 ? 3 : fit >= 2 ? 2 : 1;
}
// panel_tile: CT × TT accumulators, TT loaded vectors and one broadcast live
constexpr int kPanelCT = kRegisters >= 32 ? 4 : 3;
constexpr int kPanelTT = kRegisters >= 32 ? 4 : 3;

constexpr int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// AdamW hyperparameters, as torch.optim.AdamW derives them (double, then the math dtype).
// `unscale`: the task gradient's multiplier, 1 / a GradScaler's scale (1 without one; exact
// for the power-of-two scales GradScaler uses).
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
  double unscale = 1.0;
};

template <typename acc_t>
struct StepScalars {
  acc_t decay;           // 1 − lr·wd
  acc_t one_minus_beta1; // lerp weight of exp_avg
  acc_t beta2;
  acc_t one_minus_beta2;
  acc_t neg_step_size;   // −lr / (1 − β₁ᵗ)
  acc_t bc2_sqrt;        // √(1 − β₂ᵗ)
  acc_t eps;
  acc_t sign;            // −1 when maximizing
  acc_t unscale;         // multiplier of the task gradient (1 / grad scale)
  bool lerp_from_start;  // torch's lerp: start + w·(end − start) when |w| < 0.5

  StepScalars(const Hyper& h, double step) {
    decay = static_cast<acc_t>(1.0 - h.lr * h.weight_decay);
    one_minus_beta1 = static_cast<acc_t>(1.0 - h.beta1);
    beta2 = static_cast<acc_t>(h.beta2);
    one_minus_beta2 = static_cast<acc_t>(1.0 - h.beta2);
    const double bc1 = 1.0 - std::pow(h.beta1, step);
    const double bc2 = 1.0 - std::pow(h.beta2, step);
    neg_step_size = static_cast<acc_t>(-(h.lr / bc1));
    bc2_sqrt = static_cast<acc_t>(std::sqrt(bc2));
    eps = static_cast<acc_t>(h.eps);
    sign = h.maximize ? acc_t(-1) : acc_t(1);
    unscale = static_cast<acc_t>(h.unscale);
    lerp_from_start = std::abs(one_minus_beta1) < acc_t(0.5);
  }
};

// One AdamW element update, operation by operation as torch.optim.AdamW (single tensor path:
// mul_, lerp_, mul_/addcmul_, sqrt/div/add, addcdiv_). Returns the parameter as stored.
template <typename param_t, typename acc_t>
inline acc_t adamw_element(param_t& param, acc_t& exp_avg, acc_t& exp_avg_sq, acc_t g, const StepScalars<acc_t>& s) {
  acc_t p = static_cast<acc_t>(param) * s.decay;
  const acc_t w = s.one_minus_beta1;
  const acc_t m = s.lerp_from_start ? exp_avg + w * (g - exp_avg) : g - (g - exp_avg) * (acc_t(1) - w);
  acc_t v = exp_avg_sq * s.beta2;
  v = v + s.one_minus_beta2 * g * g;
  const acc_t denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
  p = p + s.neg_step_size * (m / denom);
  exp_avg = m;
  exp_avg_sq = v;
  param = static_cast<param_t>(p);
  return static_cast<acc_t>(param);
}

// Raw pointers and sizes of one pair (the tensors are kept alive by the caller).
struct PairView {
  void* A;
  void* B;
  const void* grad_A;
  const void* grad_B;
  void* exp_avg_A;
  void* exp_avg_sq_A;
  void* exp_avg_B;
  void* exp_avg_sq_B;
  const void* U;
  int64_t m, n, r, k;
  int64_t rp, kp;  // r and k rounded up to whole vectors
  double step_A, step_B;
  // scratch (math dtype), carved from one allocation per call:
  void* W;       // (r + k, rp): rows of Q_B, then rows of −R_B, zero-padded columns
  void* Rt;      // narrow ranks (dot_columns(r) = RC > 0): (RC, kp) −R_Bᵀ, zero-padded; else null
  void* Hc;      // (r, r) H, contiguous
  void* P_part;  // (row_blocks, r, kp): Pᵀ partials
  void* G_part;  // (row_blocks, r, rp)
  void* M_part;  // (col_blocks, r, r)
  void* P_out;   // (k, r)
  void* G_out;   // (r, r)
  void* M_out;   // (r, r)
  int64_t row_blocks, col_blocks;
  void (*row_block)(const PairView&, const Hyper&, int64_t);
  void (*col_block)(const PairView&, const Hyper&, int64_t);
  void (*reduce)(const PairView&);
};

// ------------------------------------------------------------------------- phase clock
// Built with -DASFT_PHASE_CLOCK (ASFT_CPU_PHASE_CLOCK=1 at build time, see cpp_build.py and
// bench/cpp_phases.py), the kernels add the wall time of each phase below, summed over the
// threads that run it, and asft::cpu_phase_clock returns the sums. Without the macro the
// PHASE_* statements compile to nothing.
enum Phase : int {
  kPhaseBLoad,     // B rows: the sub-tile of B widened into the math dtype
  kPhaseBQ,        // B rows: B Q_B
  kPhaseUR,        // B rows: −U R_B
  kPhaseBAdamW,    // B rows: g and the AdamW update, stored
  kPhasePPanel,    // B rows: Pᵀ += B'ᵀ U
  kPhaseGPanel,    // B rows: G += B'ᵀ B'
  kPhaseALoad,     // A columns: the block of A widened into the math dtype
  kPhaseAHA,       // A columns: H A
  kPhaseAAdamW,    // A columns: g and the AdamW update, stored
  kPhaseAGram,     // A columns: M += A' A'ᵀ
  kPhaseReduce,    // sums of the partial statistics, per pair
  kPhaseBlocks,    // the whole parallel region (wall time of the calling thread)
  kPhasePrepare,   // checks of every input, the call's scratch and its padded copies of Q_B, R_B, H
  kPhaseTerms,     // the anchoring terms (anchored_adamw_step_ only)
  kPhaseOp,        // the whole op, from its first to its last statement
  kPhaseCount
};
#ifdef ASFT_PHASE_CLOCK
std::atomic<int64_t> g_phase_ns[kPhaseCount];
inline int64_t phase_now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
struct PhaseTimer {
  int64_t t0 = phase_now();
  void lap(Phase p) {
    const int64_t t = phase_now();
    g_phase_ns[p].fetch_add(t - t0, std::memory_order_relaxed);
    t0 = t;
  }
};
// times a whole op: the sum of kPhaseOp when it goes out of scope
struct OpTimer {
  int64_t t0 = phase_now();
  ~OpTimer() { g_phase_ns[kPhaseOp].fetch_add(phase_now() - t0, std::memory_order_relaxed); }
};
#define PHASE_START PhaseTimer phase_timer_
#define PHASE_LAP(p) phase_timer_.lap(p)
#define PHASE_OP OpTimer phase_op_
#else
#define PHASE_START
#define PHASE_LAP(p)
#define PHASE_OP
#endif

// ------------------------------------------------------------------------- micro-kernels
// The loops over a tile's rows and vectors are unrolled completely, so that the compiler
// keeps every accumulator of the tile in a register (an array it cannot unroll lives on
// the stack, and each multiply-add would load and store it).
#define ASFT_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define ASFT_UNROLL ASFT_PRAGMA(unroll)
#elif defined(__GNUC__)
#define ASFT_UNROLL ASFT_PRAGMA(GCC unroll 16)
#else
#define ASFT_UNROLL
#endif
// C[j, 0 : NVC·V] = Σ_d X1[j, d] W1[d, 0 : NVC·V] + Σ_t X2[j, t] W2[t, 0 : NVC·V] for JT rows j:
// the JT × NVC accumulators stay in registers, each X element is broadcast once, each row
// of W is loaded once for all JT rows. Sums run over d, then t, in order.
// While it runs, the tile prefetches `pf_lines` cache lines from `pf` (one per step over t).
template <typename acc_t, int JT, int NVC>
inline void gemm_tile(const acc_t* __restrict X1, int64_t ldx1, int64_t K1, const acc_t* __restrict W1,
                      const acc_t* __restrict X2, int64_t ldx2, int64_t K2, const acc_t* __restrict W2, int64_t ldw,
                      acc_t* __restrict C, int64_t ldc, const char* pf, int64_t pf_lines) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  V acc[JT][NVC];
  ASFT_UNROLL
  for (int j = 0; j < JT; ++j)
    ASFT_UNROLL
    for (int v = 0; v < NVC; ++v) acc[j][v] = V(acc_t(0));
  // acc[j] += X[j, t] W[t] for every row j of the tile: one row of W loaded, X broadcast
  auto step = [&](const acc_t* __restrict X, int64_t ldx, const acc_t* __restrict Wr, int64_t t) {
    V w[NVC];
    ASFT_UNROLL
    for (int v = 0; v < NVC; ++v) w[v] = V::loadu(Wr + t * ldw + v * L);
    ASFT_UNROLL
    for (int j = 0; j < JT; ++j) {
      const V x(X[j * ldx + t]);
      ASFT_UNROLL
      for (int v = 0; v < NVC; ++v) acc[j][v] = at::vec::fmadd(x, w[v], acc[j][v]);
    }
  };
  for (int64_t d = 0; d < K1; ++d) step(X1, ldx1, W1, d);
  const int64_t t_pf = std::max<int64_t>(0, std::min(K2, pf_lines));
  for (int64_t t = 0; t < t_pf; ++t) {
    __builtin_prefetch(pf + t * 64, 0, 3);
    step(X2, ldx2, W2, t);
  }
  for (int64_t t = t_pf; t < K2; ++t) step(X2, ldx2, W2, t);
  ASFT_UNROLL
  for (int j = 0; j < JT; ++j)
    ASFT_UNROLL
    for (int v = 0; v < NVC; ++v) acc[j][v].store(C + j * ldc + v * L);
}

template <typename acc_t, int NVC>
inline void gemm_rows_nvc(const acc_t* X1, int64_t ldx1, int64_t K1, const acc_t* W1, const acc_t* X2, int64_t ldx2,
                          int64_t K2, const acc_t* W2, int64_t ldw, acc_t* C, int64_t ldc, int64_t rows,
                          const char* pf, int64_t pf_lines) {
  constexpr int JT = rows_per_tile(NVC);
  int64_t rest = rows % JT;  // tiles the loops below run: full ones, then 4, 2, 1 rows
  int64_t tiles = rows / JT;
  if (JT > 4) tiles += rest / 4, rest %= 4;
  if (JT > 2) tiles += rest / 2, rest %= 2;
  tiles += rest;
  const int64_t per_tile = (pf_lines + tiles - 1) / std::max<int64_t>(tiles, 1);
  int64_t j = 0;
  for (; j + JT <= rows; j += JT, pf += per_tile * 64, pf_lines -= per_tile)
    gemm_tile<acc_t, JT, NVC>(X1 + j * ldx1, ldx1, K1, W1, X2 + j * ldx2, ldx2, K2, W2, ldw, C + j * ldc, ldc, pf,
                              std::min(per_tile, pf_lines));
  // the rows left over (e.g. 4 of r = 64 rows of H A in tiles of 6): a tile of 4, of 2, then
  // single rows, each row still summed over d, then t, in order
  if constexpr (JT > 4) {
    for (; j + 4 <= rows; j += 4, pf += per_tile * 64, pf_lines -= per_tile)
      gemm_tile<acc_t, 4, NVC>(X1 + j * ldx1, ldx1, K1, W1, X2 + j * ldx2, ldx2, K2, W2, ldw, C + j * ldc, ldc, pf,
                               std::min(per_tile, pf_lines));
  }
  if constexpr (JT > 2) {
    for (; j + 2 <= rows; j += 2, pf += per_tile * 64, pf_lines -= per_tile)
      gemm_tile<acc_t, 2, NVC>(X1 + j * ldx1, ldx1, K1, W1, X2 + j * ldx2, ldx2, K2, W2, ldw, C + j * ldc, ldc, pf,
                               std::min(per_tile, pf_lines));
  }
  for (; j < rows; ++j, pf += per_tile * 64, pf_lines -= per_tile)
    gemm_tile<acc_t, 1, NVC>(X1 + j * ldx1, ldx1, K1, W1, X2 + j * ldx2, ldx2, K2, W2, ldw, C + j * ldc, ldc, pf,
                             std::min(per_tile, pf_lines));
}

// C (rows × cols, cols a multiple of the vector width) = X1 W1 + X2 W2 (see gemm_tile);
// X1 or X2 may be absent (K = 0). Prefetches `pf_lines` lines from `pf` on the way.
template <typename acc_t>
void gemm_rows(const acc_t* X1, int64_t ldx1, int64_t K1, const acc_t* W1, const acc_t* X2, int64_t ldx2, int64_t K2,
               const acc_t* W2, int64_t ldw, acc_t* C, int64_t ldc, int64_t rows, int64_t cols,
               const char* pf = nullptr, int64_t pf_lines = 0) {
  constexpr int64_t L = Vec<acc_t>::size();
  for (int64_t c0 = 0; c0 < cols; c0 += kMaxNVC * L) {
    const int64_t nvc = std::min<int64_t>(kMaxNVC, (cols - c0) / L);
    const acc_t* w1 = W1 ? W1 + c0 : nullptr;
    const acc_t* w2 = W2 ? W2 + c0 : nullptr;
    const int64_t lines = c0 == 0 ? pf_lines : 0;
    switch (nvc) {
      case 1: gemm_rows_nvc<acc_t, 1>(X1, ldx1, K1, w1, X2, ldx2, K2, w2, ldw, C + c0, ldc, rows, pf, lines); break;
      case 2: gemm_rows_nvc<acc_t, 2>(X1, ldx1, K1, w1, X2, ldx2, K2, w2, ldw, C + c0, ldc, rows, pf, lines); break;
      case 3: gemm_rows_nvc<acc_t, 3>(X1, ldx1, K1, w1, X2, ldx2, K2, w2, ldw, C + c0, ldc, rows, pf, lines); break;
      default: gemm_rows_nvc<acc_t, 4>(X1, ldx1, K1, w1, X2, ldx2, K2, w2, ldw, C + c0, ldc, rows, pf, lines); break;
    }
  }
}

// Narrow ranks (r ≤ V/2, where a row of C would leave at least half of a vector's lanes
// idle): C[j, c] = Σ_t X[j, t] Wt[c, t] as dot products along t. JD = V / RC rows × RC
// columns of accumulators, each a vector of partial sums over t ≡ lane (mod V), are reduced
// together by a fixed tree of deinterleaves (lane q of the result: row q / RC, column q % RC).
// Wt: (RC, ldw) rows zero-padded to whole vectors (and zero rows beyond r).
template <typename acc_t, int RC>
void dot_rows(const acc_t* __restrict X, int64_t ldx, int64_t K, const acc_t* __restrict Wt, int64_t ldw,
              acc_t* __restrict C, int64_t ldc, int64_t r, int64_t rows, const char* pf, int64_t pf_lines) {
  using V = Vec<acc_t>;
  constexpr int L = V::size();
  constexpr int JD = L / RC;
  const int64_t kfull = K / L * L;
  const int64_t tail = K - kfull;
  const int64_t groups = (rows + JD - 1) / JD;
  const int64_t per_group = (pf_lines + groups - 1) / std::max<int64_t>(groups, 1);
  for (int64_t j0 = 0; j0 < rows; j0 += JD) {
    const acc_t* x[JD];
    ASFT_UNROLL
    for (int j = 0; j < JD; ++j) x[j] = X + std::min<int64_t>(j0 + j, rows - 1) * ldx;  // a short group repeats its last row
    V acc[L];
    ASFT_UNROLL
    for (int q = 0; q < L; ++q) acc[q] = V(acc_t(0));
    const int64_t lines = std::min(per_group, pf_lines);
    const int64_t steps = std::max<int64_t>(1, kfull / L);
    const int64_t per_step = (lines + steps - 1) / steps;  // spread over the loop: a burst stalls on the fill buffers
    int64_t issued = 0;
    for (int64_t t = 0; t < kfull; t += L) {
      for (int64_t i = 0; i < per_step && issued < lines; ++i, ++issued) __builtin_prefetch(pf + issued * 64, 0, 3);
      V w[RC];
      ASFT_UNROLL
      for (int c = 0; c < RC; ++c) w[c] = V::loadu(Wt + c * ldw + t);
      ASFT_UNROLL
      for (int j = 0; j < JD; ++j) {
        const V xv = V::loadu(x[j] + t);
        ASFT_UNROLL
        for (int c = 0; c < RC; ++c) acc[j * RC + c] = at::vec::fmadd(xv, w[c], acc[j * RC + c]);
      }
    }
    for (; issued < lines; ++issued) __builtin_prefetch(pf + issued * 64, 0, 3);
    pf += lines * 64;
    pf_lines -= lines;
    if (tail > 0) {
      V w[RC];
      ASFT_UNROLL
      for (int c = 0; c < RC; ++c) w[c] = V::loadu(Wt + c * ldw + kfull);
      ASFT_UNROLL
      for (int j = 0; j < JD; ++j) {
        const V xv = V::loadu(x[j] + kfull, tail);
        ASFT_UNROLL
        for (int c = 0; c < RC; ++c) acc[j * RC + c] = at::vec::fmadd(xv, w[c], acc[j * RC + c]);
      }
    }
    ASFT_UNROLL
    for (int n = L; n > 1; n /= 2) {
      ASFT_UNROLL
      for (int q = 0; q < n / 2; ++q) {
        const auto eo = at::vec::deinterleave2(acc[2 * q], acc[2 * q + 1]);
        acc[q] = eo.first + eo.second;
      }
    }
    alignas(64) acc_t out[L];
    acc[0].store(out);
    const int64_t jn = std::min<int64_t>(JD, rows - j0);
    for (int64_t j = 0; j < jn; ++j)
      for (int64_t c = 0; c < r; ++c) C[(j0 + j) * ldc + c] = out[j * RC + c];
  }
}

// the dot form's column count for rank r: the power of two ≥ r, or 0 when r > V/2 (the
// outer-product tiles use at least half of every vector there)
template <typename acc_t>
constexpr int64_t dot_columns(int64_t r) {
  constexpr int64_t half = Vec<acc_t>::size() / 2;
  if (r > half) return 0;
  int64_t rc = 1;
  while (rc < r) rc *= 2;
  return rc;
}

template <typename acc_t>
void dot_rows_any(const acc_t* X, int64_t ldx, int64_t K, const acc_t* Wt, int64_t ldw, acc_t* C, int64_t ldc,
                  int64_t r, int64_t rows, const char* pf, int64_t pf_lines) {
  switch (dot_columns<acc_t>(r)) {
    case 1: dot_rows<acc_t, 1>(X, ldx, K, Wt, ldw, C, ldc, r, rows, pf, pf_lines); break;
    case 2: dot_rows<acc_t, 2>(X, ldx, K, Wt, ldw, C, ldc, r, rows, pf, pf_lines); break;
    case 4: if constexpr (Vec<acc_t>::size() >= 8) dot_rows<acc_t, 4>(X, ldx, K, Wt, ldw, C, ldc, r, rows, pf, pf_lines); break;
    case 8: if constexpr (Vec<acc_t>::size() >= 16) dot_rows<acc_t, 8>(X, ldx, K, Wt, ldw, C, ldc, r, rows, pf, pf_lines); break;
    default: break;
  }
}

// O[c, 0 : TT·V] += Σ_j X[j, c] Y[j, 0 : TT·V] for CT consecutive c, over `rows` rows j in
// order; with kMask the last vector of each Y row is loaded with `last` lanes (the others
// read as 0).
template <typename acc_t, int CT, int TT, bool kMask>
inline void panel_tile(const acc_t* __restrict X, int64_t ldx, const acc_t* __restrict Y, int64_t ldy, int64_t rows,
                       int64_t last, acc_t* __restrict O, int64_t ldo) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  V acc[CT][TT];
  ASFT_UNROLL
  for (int c = 0; c < CT; ++c)
    ASFT_UNROLL
    for (int v = 0; v < TT; ++v) acc[c][v] = V::loadu(O + c * ldo + v * L);
  for (int64_t j = 0; j < rows; ++j) {
    const acc_t* y_row = Y + j * ldy;
    V y[TT];
    ASFT_UNROLL
    for (int v = 0; v < TT; ++v) y[v] = (kMask && v == TT - 1) ? V::loadu(y_row + v * L, last) : V::loadu(y_row + v * L);
    ASFT_UNROLL
    for (int c = 0; c < CT; ++c) {
      const V x(X[j * ldx + c]);
      ASFT_UNROLL
      for (int v = 0; v < TT; ++v) acc[c][v] = at::vec::fmadd(x, y[v], acc[c][v]);
    }
  }
  ASFT_UNROLL
  for (int c = 0; c < CT; ++c)
    ASFT_UNROLL
    for (int v = 0; v < TT; ++v) acc[c][v].store(O + c * ldo + v * L);
}

template <typename acc_t, int CT, int TT>
inline void panel_tile_any(const acc_t* X, int64_t ldx, const acc_t* Y, int64_t ldy, int64_t rows, int64_t last,
                           acc_t* O, int64_t ldo) {
  if (last == Vec<acc_t>::size())
    panel_tile<acc_t, CT, TT, false>(X, ldx, Y, ldy, rows, last, O, ldo);
  else
    panel_tile<acc_t, CT, TT, true>(X, ldx, Y, ldy, rows, last, O, ldo);
}

template <typename acc_t, int CT>
inline void panel_cols(const acc_t* X, int64_t ldx, const acc_t* Y, int64_t ldy, int64_t ny, int64_t rows, acc_t* O,
                       int64_t ldo) {
  constexpr int64_t L = Vec<acc_t>::size();
  for (int64_t y0 = 0; y0 < ny; y0 += kPanelTT * L) {
    const int64_t nv = std::min<int64_t>(kPanelTT, (ny - y0 + L - 1) / L);
    const int64_t last = std::min(L, ny - y0 - (nv - 1) * L);  // lanes of the chunk's last vector
    switch (nv) {
      case 1: panel_tile_any<acc_t, CT, 1>(X, ldx, Y + y0, ldy, rows, last, O + y0, ldo); break;
      case 2: panel_tile_any<acc_t, CT, 2>(X, ldx, Y + y0, ldy, rows, last, O + y0, ldo); break;
      case 3: panel_tile_any<acc_t, CT, 3>(X, ldx, Y + y0, ldy, rows, last, O + y0, ldo); break;
      default: panel_tile_any<acc_t, CT, kPanelTT>(X, ldx, Y + y0, ldy, rows, last, O + y0, ldo); break;
    }
  }
}

// O (nc × ldo) += Xᵀ Y over `rows` rows: X (rows × ldx, columns 0..nc-1 used), Y (rows ×
// ldy, columns 0..ny-1 used); every entry is summed over j in order.
template <typename acc_t>
void panel(const acc_t* X, int64_t ldx, int64_t nc, const acc_t* Y, int64_t ldy, int64_t ny, int64_t rows, acc_t* O,
           int64_t ldo) {
  int64_t c = 0;
  for (; c + kPanelCT <= nc; c += kPanelCT) panel_cols<acc_t, kPanelCT>(X + c, ldx, Y, ldy, ny, rows, O + c * ldo, ldo);
  switch (nc - c) {
    case 0: break;
    case 1: panel_cols<acc_t, 1>(X + c, ldx, Y, ldy, ny, rows, O + c * ldo, ldo); break;
    case 2: panel_cols<acc_t, 2>(X + c, ldx, Y, ldy, ny, rows, O + c * ldo, ldo); break;
    default: panel_cols<acc_t, 3>(X + c, ldx, Y, ldy, ny, rows, O + c * ldo, ldo); break;
  }
}

// ---------------------------------------------------------------------------------- B rows
template <typename param_t, typename acc_t, bool kUpdate>
void b_row_block(const PairView& pv, const Hyper& h, int64_t blk) {
  const int64_t r = pv.r, k = pv.k, rp = pv.rp, kp = pv.kp;
  const int64_t i0 = blk * kRowBlock;
  const int64_t i1 = std::min(pv.m, i0 + kRowBlock);
  acc_t* P = static_cast<acc_t*>(pv.P_part) + blk * r * kp;
  acc_t* G = static_cast<acc_t*>(pv.G_part) + blk * r * rp;
  std::fill(P, P + r * kp, acc_t(0));
  std::fill(G, G + r * rp, acc_t(0));
  std::optional<StepScalars<acc_t>> s;
  if constexpr (kUpdate) s.emplace(h, pv.step_B);

  // bt: the sub-tile of B in the math dtype (kSubRows × rp, zero-padded columns); qt, ut:
  // its B Q_B and −U R_B (same layout), kept apart so that g rounds as (grad + B Q_B) − U R_B
  constexpr int64_t kStackRank = 64;  // ranks up to 64 keep the tiles on the stack
  alignas(64) acc_t stack[3 * kSubRows * kStackRank];
  std::vector<acc_t> heap;
  acc_t* bt = stack;
  if (rp > kStackRank) {
    heap.resize(3 * kSubRows * rp);
    bt = heap.data();
  }
  acc_t* qt = bt + kSubRows * rp;
  acc_t* ut = qt + kSubRows * rp;
  param_t* Bp = static_cast<param_t*>(pv.B);
  const acc_t* U = static_cast<const acc_t*>(pv.U);

  PHASE_START;
  for (int64_t i = i0; i < i1; i += kSubRows) {
    const int64_t rows = std::min(kSubRows, i1 - i);
    const acc_t* Ui = U + i * k;
    for (int64_t j = 0; j < rows; ++j) {
      const param_t* src = Bp + (i + j) * r;
      acc_t* dst = bt + j * rp;
#pragma omp simd
      for (int64_t c = 0; c < r; ++c) dst[c] = static_cast<acc_t>(src[c]);
      for (int64_t c = r; c < rp; ++c) dst[c] = acc_t(0);
    }
    PHASE_LAP(kPhaseBLoad);
    if constexpr (kUpdate) {
      const acc_t* W = static_cast<const acc_t*>(pv.W);
      gemm_rows<acc_t>(bt, rp, r, W, nullptr, 0, 0, nullptr, rp, qt, rp, rows, rp);
      PHASE_LAP(kPhaseBQ);
      // the next sub-tile's rows of U are fetched while this one computes (cold caches: the
      // step runs after forward/backward)
      const int64_t next_rows = std::min(kSubRows, i1 - i - rows);
      const int64_t pf_lines = next_rows > 0 ? (next_rows * k * static_cast<int64_t>(sizeof(acc_t)) + 63) / 64 : 0;
      if (pv.Rt != nullptr)
        dot_rows_any<acc_t>(Ui, k, k, static_cast<const acc_t*>(pv.Rt), kp, ut, rp, r, rows,
                            reinterpret_cast<const char*>(Ui + rows * k), pf_lines);
      else
        gemm_rows<acc_t>(nullptr, 0, 0, nullptr, Ui, k, k, W + r * rp, rp, ut, rp, rows, rp,
                         reinterpret_cast<const char*>(Ui + rows * k), pf_lines);
      PHASE_LAP(kPhaseUR);
      const param_t* __restrict gB = static_cast<const param_t*>(pv.grad_B) + i * r;
      acc_t* __restrict mB = static_cast<acc_t*>(pv.exp_avg_B) + i * r;
      acc_t* __restrict vB = static_cast<acc_t*>(pv.exp_avg_sq_B) + i * r;
      param_t* __restrict Bi = Bp + i * r;
      const int64_t row_bytes_p = r * static_cast<int64_t>(sizeof(param_t));
      const int64_t row_bytes_a = r * static_cast<int64_t>(sizeof(acc_t));
      for (int64_t j = 0; j < rows; ++j) {
        if (i + kSubRows + j < i1) {  // the next sub-tile's B, grad and moments, row by row
          const int64_t x = (kSubRows + j) * r;
          for (int64_t o = 0; o < row_bytes_p; o += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(Bi + x) + o, 1, 3);
            __builtin_prefetch(reinterpret_cast<const char*>(gB + x) + o, 0, 3);
          }
          for (int64_t o = 0; o < row_bytes_a; o += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(mB + x) + o, 1, 3);
            __builtin_prefetch(reinterpret_cast<const char*>(vB + x) + o, 1, 3);
          }
        }
        acc_t* __restrict bj = bt + j * rp;
        const acc_t* __restrict qj = qt + j * rp;
        const acc_t* __restrict uj = ut + j * rp;
#pragma omp simd
        for (int64_t c = 0; c < r; ++c) {
          const int64_t x = j * r + c;
          const acc_t g = s->sign * ((static_cast<acc_t>(gB[x]) * s->unscale + qj[c]) + uj[c]);
          bj[c] = adamw_element<param_t, acc_t>(Bi[x], mB[x], vB[x], g, *s);
        }
      }
    }
    PHASE_LAP(kPhaseBAdamW);
    // Pᵀ += B'ᵀ U, G += B'ᵀ B' (rows of the sub-tile in order; U is still in L1)
    panel<acc_t>(bt, rp, r, Ui, k, k, rows, P, kp);
    PHASE_LAP(kPhasePPanel);
    panel<acc_t>(bt, rp, r, bt, rp, r, rows, G, rp);
    PHASE_LAP(kPhaseGPanel);
  }
}

// ------------------------------------------------------------------------------- A columns
// M[d0 + i, e0 + j] = M[e0 + j, d0 + i] = Σ_x a[d0 + i, x] a[e0 + j, x] for a TG × TG tile:
// each entry is summed in the lanes of one vector (x in order within a lane), then the
// lanes are added in a fixed tree, whatever the tile it was computed in.
constexpr int kGramTile = kRegisters >= 32 ? 4 : 2;

template <typename acc_t>
inline void gram_tile(const acc_t* __restrict a, int64_t W, int64_t wpad, int64_t d0, int64_t e0, int64_t r,
                      acc_t* __restrict M) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  constexpr int TG = kGramTile;
  V acc[TG][TG];
  ASFT_UNROLL
  for (int i = 0; i < TG; ++i)
    ASFT_UNROLL
    for (int j = 0; j < TG; ++j) acc[i][j] = V(acc_t(0));
  for (int64_t x = 0; x < wpad; x += L) {
    V ad[TG], ae[TG];
    ASFT_UNROLL
    for (int i = 0; i < TG; ++i) ad[i] = V::loadu(a + (d0 + i) * W + x);
    ASFT_UNROLL
    for (int j = 0; j < TG; ++j) ae[j] = V::loadu(a + (e0 + j) * W + x);
    ASFT_UNROLL
    for (int i = 0; i < TG; ++i)
      ASFT_UNROLL
      for (int j = 0; j < TG; ++j) acc[i][j] = at::vec::fmadd(ad[i], ae[j], acc[i][j]);
  }
  for (int i = 0; i < TG; ++i) {
    for (int j = 0; j < TG; ++j) {
      const int64_t d = d0 + i, e = e0 + j;
      if (d >= r || e >= r) continue;
      alignas(64) acc_t lanes[L];
      acc[i][j].store(lanes);
      for (int64_t width = L / 2; width >= 1; width /= 2)
        for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
      M[d * r + e] = lanes[0];
      M[e * r + d] = lanes[0];
    }
  }
}

template <typename param_t, typename acc_t, bool kUpdate>
void a_col_block(const PairView& pv, const Hyper& h, int64_t blk) {
  constexpr int64_t W = kColBlock;
  constexpr int CW = std::max<int>(64 / sizeof(acc_t), Vec<acc_t>::size());  // padding: whole vectors
  static_assert(W % CW == 0, "column block must hold whole vectors");
  const int64_t r = pv.r, n = pv.n;
  const int64_t c0 = blk * W;
  const int64_t w = std::min(W, n - c0);
  const int64_t wpad = (w + CW - 1) / CW * CW;
  // a: (rg, W) block of A in the math dtype, zero-padded to whole vectors and to whole gram
  // tiles of rows; ha: (r, W) H A. One buffer per thread, kept between calls (no page faults).
  PHASE_START;
  const int64_t rg = round_up(r, kGramTile);
  thread_local std::vector<acc_t> buf;
  if (buf.size() < static_cast<size_t>((rg + r) * W)) buf.resize(static_cast<size_t>((rg + r) * W));
  acc_t* __restrict a = buf.data();
  param_t* __restrict Ap = static_cast<param_t*>(pv.A);
  const param_t* __restrict gA = static_cast<const param_t*>(pv.grad_A);
  acc_t* __restrict mA = static_cast<acc_t*>(pv.exp_avg_A);
  acc_t* __restrict vA = static_cast<acc_t*>(pv.exp_avg_sq_A);
  for (int64_t d = 0; d < r; ++d) {
    const param_t* src = Ap + d * n + c0;
    acc_t* dst = a + d * W;
    if constexpr (kUpdate) {  // this row's gradient and moments, used after H A
      const int64_t off = d * n + c0;
      for (int64_t o = 0; o < w * static_cast<int64_t>(sizeof(param_t)); o += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(gA + off) + o, 0, 3);
      for (int64_t o = 0; o < w * static_cast<int64_t>(sizeof(acc_t)); o += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(mA + off) + o, 1, 3);
        __builtin_prefetch(reinterpret_cast<const char*>(vA + off) + o, 1, 3);
      }
    }
#pragma omp simd
    for (int64_t x = 0; x < w; ++x) dst[x] = static_cast<acc_t>(src[x]);
    for (int64_t x = w; x < wpad; ++x) dst[x] = acc_t(0);
  }
  std::fill(a + r * W, a + rg * W, acc_t(0));

  if constexpr (kUpdate) {
    const StepScalars<acc_t> s(h, pv.step_A);
    const acc_t* __restrict H = static_cast<const acc_t*>(pv.Hc);
    acc_t* __restrict ha = a + rg * W;
    // ha = H a: rows of H broadcast, rows of a loaded (as B Q_B above)
    PHASE_LAP(kPhaseALoad);
    gemm_rows<acc_t>(H, r, r, a, nullptr, 0, 0, nullptr, W, ha, W, r, wpad);
    PHASE_LAP(kPhaseAHA);
    // `a` is no longer needed as input: it receives the stored new values
    for (int64_t d = 0; d < r; ++d) {
      const int64_t off = d * n + c0;
      const acc_t* had = ha + d * W;
      acc_t* out = a + d * W;
#pragma omp simd
      for (int64_t x = 0; x < w; ++x) {
        const acc_t g = s.sign * (static_cast<acc_t>(gA[off + x]) * s.unscale + had[x]);
        out[x] = adamw_element<param_t, acc_t>(Ap[off + x], mA[off + x], vA[off + x], g, s);
      }
    }
  }

  PHASE_LAP(kUpdate ? kPhaseAAdamW : kPhaseALoad);
  // M += A[:, block] A[:, block]ᵀ over tiles on and below the diagonal
  acc_t* M = static_cast<acc_t*>(pv.M_part) + blk * r * r;
  for (int64_t d0 = 0; d0 < r; d0 += kGramTile)
    for (int64_t e0 = 0; e0 <= d0; e0 += kGramTile) gram_tile<acc_t>(a, W, wpad, d0, e0, r, M);
  PHASE_LAP(kPhaseAGram);
}

// Sum the partials of one pair in block order into its (k, r) / (r, r) outputs.
template <typename acc_t>
void reduce_pair(const PairView& pv) {
  const int64_t k = pv.k, r = pv.r, rp = pv.rp, kp = pv.kp;
  acc_t* P = static_cast<acc_t*>(pv.P_out);
  acc_t* G = static_cast<acc_t*>(pv.G_out);
  acc_t* M = static_cast<acc_t*>(pv.M_out);
  std::fill(P, P + k * r, acc_t(0));
  std::fill(G, G + r * r, acc_t(0));
  std::fill(M, M + r * r, acc_t(0));
  // the Pᵀ partials summed in their own layout (contiguous rows, in block order) into the
  // first block's partial (scratch of this call), then transposed once into P (k, r)
  acc_t* Pt = static_cast<acc_t*>(pv.P_part);  // (row_blocks, r, kp)
  if (pv.row_blocks > 0) {
    acc_t* __restrict sum = Pt;
    for (int64_t b = 1; b < pv.row_blocks; ++b) {
      const acc_t* __restrict src = Pt + b * r * kp;
#pragma omp simd
      for (int64_t x = 0; x < r * kp; ++x) sum[x] += src[x];
    }
    // in tiles of 16 values of t: each tile's reads and writes stay within a few cache lines
    for (int64_t t0 = 0; t0 < k; t0 += 16)
      for (int64_t c = 0; c < r; ++c)
        for (int64_t t = t0; t < std::min(k, t0 + 16); ++t) P[t * r + c] = sum[c * kp + t];
  }
  for (int64_t b = 0; b < pv.row_blocks; ++b) {
    const acc_t* Gb = static_cast<const acc_t*>(pv.G_part) + b * r * rp;
    for (int64_t d = 0; d < r; ++d)
#pragma omp simd
      for (int64_t c = 0; c < r; ++c) G[d * r + c] += Gb[d * rp + c];
  }
  for (int64_t b = 0; b < pv.col_blocks; ++b) {
    const acc_t* Mb = static_cast<const acc_t*>(pv.M_part) + b * r * r;
#pragma omp simd
    for (int64_t x = 0; x < r * r; ++x) M[x] += Mb[x];
  }
}

template <typename param_t, bool kUpdate>
void select_kernels(PairView& pv) {
  using acc_t = at::opmath_type<param_t>;
  pv.row_block = &b_row_block<param_t, acc_t, kUpdate>;
  pv.col_block = &a_col_block<param_t, acc_t, kUpdate>;
  pv.reduce = &reduce_pair<acc_t>;
}

// Run every block of every pair, then every reduction. Deterministic: see the file header.
// hA: A's hyperparameters (column blocks), hB: B's (row blocks); A and B may sit in param
// groups of different lr, weight decay, ... (LoRA+).
void run_pairs(std::vector<PairView>& pairs, const Hyper& hA, const Hyper& hB) {
  struct Task {
    int32_t pair;
    int32_t is_row;
    int64_t blk;
  };
  std::vector<Task> tasks;
  // row blocks (the heavier ones: they read U) first, so the dynamic schedule ends evenly
  for (size_t j = 0; j < pairs.size(); ++j)
    for (int64_t b = 0; b < pairs[j].row_blocks; ++b) tasks.push_back({static_cast<int32_t>(j), 1, b});
  for (size_t j = 0; j < pairs.size(); ++j)
    for (int64_t b = 0; b < pairs[j].col_blocks; ++b) tasks.push_back({static_cast<int32_t>(j), 0, b});

  PHASE_START;
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next{0};
  // blocks of each pair still running: the worker that finishes a pair's last block sums its
  // partials (in block order, whoever it is), in the same parallel region
  std::vector<std::atomic<int64_t>> pending(pairs.size());
  for (size_t j = 0; j < pairs.size(); ++j) pending[j].store(pairs[j].row_blocks + pairs[j].col_blocks);
  for (size_t j = 0; j < pairs.size(); ++j)
    if (pending[j].load() == 0) pairs[j].reduce(pairs[j]);  // an empty pair: zero statistics
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) {
      const Task& task = tasks[t];
      const PairView& pv = pairs[task.pair];
      if (task.is_row)
        pv.row_block(pv, hB, task.blk);
      else
        pv.col_block(pv, hA, task.blk);
      if (pending[task.pair].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        PHASE_START;
        pv.reduce(pv);
        PHASE_LAP(kPhaseReduce);
      }
    }
  });
  PHASE_LAP(kPhaseBlocks);
}

// ------------------------------------------------------------------------------ validation
// "(m, r)": shapes written as Python prints them
std::string dims_str(at::IntArrayRef dims) {
  std::string s = "(";
  for (size_t d = 0; d < dims.size(); ++d) s += (d ? ", " : "") + std::to_string(dims[d]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

std::string shape_str(const at::Tensor& t) { return dims_str(t.sizes()); }

void check_tensor(const at::Tensor& t, const char* name, size_t j, at::IntArrayRef shape, at::ScalarType dtype,
                  bool need_contiguous) {
  TORCH_CHECK_VALUE(t.defined(), "asft::cpp: ", name, "[", j, "] is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "asft::cpp: ", name, "[", j, "] must be a CPU tensor, found ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, "asft::cpp: ", name, "[", j, "] must have shape ", dims_str(shape), ", found ",
                    shape_str(t));
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "asft::cpp: ", name, "[", j, "] must be ", dtype, ", found ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(!need_contiguous || t.is_contiguous(), "asft::cpp: ", name, "[", j, "] must be contiguous");
}

bool supported_param(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks U, B, A of pair j; returns (m, n, r, k).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_pair(const at::Tensor& U, const at::Tensor& B,
                                                          const at::Tensor& A, size_t j) {
  TORCH_CHECK_VALUE(A.dim() == 2 && B.dim() == 2 && U.dim() == 2, "asft::cpp: pair ", j,
                    " needs 2-d A (r, n), B (m, r), U (m, k); found A ", shape_str(A), ", B ", shape_str(B), ", U ",
                    shape_str(U));
  const int64_t r = A.size(0), n = A.size(1), m = B.size(0), k = U.size(1);
  TORCH_CHECK_VALUE(supported_param(B.scalar_type()), "asft::cpp: B[", j, "] must be fp64/fp32/bf16/fp16, found ",
                    B.scalar_type());
  check_tensor(B, "B", j, {m, r}, B.scalar_type(), true);
  check_tensor(A, "A", j, {r, n}, B.scalar_type(), true);
  TORCH_CHECK_VALUE(U.device().is_cpu(), "asft::cpp: U[", j, "] must be a CPU tensor, found ", U.device());
  TORCH_CHECK_VALUE(U.size(0) == m, "asft::cpp: U[", j, "] must have ", m, " rows like B, found ", shape_str(U));
  const auto ut = U.scalar_type();
  TORCH_CHECK_VALUE(ut == at::kDouble || ut == at::kFloat || ut == at::kBFloat16, "asft::cpp: U[", j,
                    "] must be fp64/fp32/bf16, found ", ut);
  return {m, n, r, k};
}

// U in the math dtype, contiguous: the tensor itself when it already is (no dispatched op),
// else a converted copy (bf16 basis, strided view) kept alive in `keep`.
const void* basis_in(const at::Tensor& U, at::ScalarType acc, std::vector<at::Tensor>& keep) {
  if (U.scalar_type() == acc && U.is_contiguous()) return U.const_data_ptr();
  keep.push_back(U.to(acc).contiguous());
  return keep.back().const_data_ptr();
}

template <bool kUpdate>
void bind_kernels(PairView& pv, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "asft_cpu", [&] {
    select_kernels<scalar_t, kUpdate>(pv);
  });
}

// Byte offsets of one pair's scratch regions in the call's single scratch allocation.
struct ScratchOffsets {
  int64_t W = -1, Rt = -1, Hc = -1, P = 0, G = 0, M = 0;
};

// Block counts, padded sizes and scratch regions of pair `pv` (m, n, r, k set); `total`
// (bytes) grows by what the pair needs, each region 64-byte aligned.
ScratchOffsets plan_scratch(PairView& pv, at::ScalarType acc, bool update, int64_t& total) {
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const int64_t lanes = acc == at::kDouble ? Vec<double>::size() : Vec<float>::size();
  pv.rp = round_up(pv.r, lanes);
  pv.kp = round_up(pv.k, lanes);
  pv.row_blocks = (pv.m + kRowBlock - 1) / kRowBlock;
  pv.col_blocks = (pv.n + kColBlock - 1) / kColBlock;
  auto take = [&](int64_t elems) {
    const int64_t off = total;
    total += round_up(elems * elem, 64);
    return off;
  };
  ScratchOffsets o;
  if (update) {
    o.W = take((pv.r + pv.k) * pv.rp);
    const int64_t rc = acc == at::kDouble ? dot_columns<double>(pv.r) : dot_columns<float>(pv.r);
    if (rc > 0) o.Rt = take(rc * pv.kp);
    o.Hc = take(pv.r * pv.r);
  }
  o.P = take(pv.row_blocks * pv.r * pv.kp);
  o.G = take(pv.row_blocks * pv.r * pv.rp);
  o.M = take(pv.col_blocks * pv.r * pv.r);
  return o;
}

void place_scratch(PairView& pv, const ScratchOffsets& o, uint8_t* base) {
  pv.W = o.W >= 0 ? base + o.W : nullptr;
  pv.Rt = o.Rt >= 0 ? base + o.Rt : nullptr;
  pv.Hc = o.Hc >= 0 ? base + o.Hc : nullptr;
  pv.P_part = base + o.P;
  pv.G_part = base + o.G;
  pv.M_part = base + o.M;
}

// W = [Q_B; −R_B] with zero-padded columns, Hc = H (any strides in, contiguous out).
template <typename acc_t>
void fill_weights(const PairView& pv, const acc_t* q, int64_t q0, int64_t q1, const acc_t* rb, int64_t r0,
                  int64_t r1, const acc_t* hh, int64_t h0, int64_t h1) {
  const int64_t r = pv.r, k = pv.k, rp = pv.rp;
  acc_t* W = static_cast<acc_t*>(pv.W);
  for (int64_t d = 0; d < r; ++d)
    for (int64_t c = 0; c < rp; ++c) W[d * rp + c] = c < r ? q[d * q0 + c * q1] : acc_t(0);
  for (int64_t t = 0; t < k; ++t)
    for (int64_t c = 0; c < rp; ++c) W[(r + t) * rp + c] = c < r ? -rb[t * r0 + c * r1] : acc_t(0);
  if (pv.Rt != nullptr) {
    const int64_t rc = dot_columns<acc_t>(r), kp = pv.kp;
    acc_t* Rt = static_cast<acc_t*>(pv.Rt);
    for (int64_t c = 0; c < rc; ++c)
      for (int64_t t = 0; t < kp; ++t) Rt[c * kp + t] = (c < r && t < k) ? -rb[t * r0 + c * r1] : acc_t(0);
  }
  acc_t* Hc = static_cast<acc_t*>(pv.Hc);
  for (int64_t d = 0; d < r; ++d)
    for (int64_t e = 0; e < r; ++e) Hc[d * r + e] = hh[d * h0 + e * h1];
}

template <typename acc_t>
void fill_weights(const PairView& pv, const at::Tensor& Q, const at::Tensor& R, const at::Tensor& H) {
  fill_weights<acc_t>(pv, Q.const_data_ptr<acc_t>(), Q.stride(0), Q.stride(1), R.const_data_ptr<acc_t>(), R.stride(0),
                      R.stride(1), H.const_data_ptr<acc_t>(), H.stride(0), H.stride(1));
}

// The scratch of one call (64-byte aligned): the calling thread's buffer of its earlier
// calls when the need is at most kKeepScratch bytes (a fresh allocation of that size is
// page-faulted in on every call, which costs as much as a small step), else `fresh`, an
// allocation released when the call returns.
constexpr int64_t kKeepScratch = 32 << 20;

uint8_t* call_scratch(int64_t total, at::Tensor& fresh) {
  if (total > kKeepScratch) {
    fresh = at::empty({total}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
    return fresh.data_ptr<uint8_t>();
  }
  thread_local std::vector<uint8_t> kept;
  if (static_cast<int64_t>(kept.size()) < total + 64) kept.resize(static_cast<size_t>(total + 64));
  const auto p = reinterpret_cast<uintptr_t>(kept.data());
  return reinterpret_cast<uint8_t*>((p + 63) & ~static_cast<uintptr_t>(63));
}

// A step counter: a one-element fp32/fp64 CPU tensor (the optimizer's state["step"]), read
// without a dispatched op.
double step_value(const at::Tensor& t, const char* name, size_t j) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.numel() == 1 &&
                        (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                    "asft::cpp: ", name, "[", j, "] must be a one-element fp32/fp64 CPU tensor, found ",
                    t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
  return t.scalar_type() == at::kFloat ? static_cast<double>(*t.const_data_ptr<float>())
                                       : *t.const_data_ptr<double>();
}

// ------------------------------------------------------------------------------------- ops
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> stats_pass_cpu(
    at::TensorList U, at::TensorList B, at::TensorList A) {
  TORCH_CHECK_VALUE(U.size() == B.size() && B.size() == A.size(), "asft::cpp: stats_pass needs as many U as B and A, ",
                    "found ", U.size(), ", ", B.size(), ", ", A.size());
  const size_t npairs = B.size();
  std::vector<at::Tensor> Ps, Gs, Ms, keep;
  std::vector<PairView> pairs(npairs);
  std::vector<ScratchOffsets> offsets(npairs);
  int64_t total = 0;
  for (size_t j = 0; j < npairs; ++j) {
    auto [m, n, r, k] = check_pair(U[j], B[j], A[j], j);
    const auto acc = acc_type(B[j].scalar_type());
    auto opts = at::TensorOptions().dtype(acc).device(at::kCPU);
    Ps.push_back(at::empty({k, r}, opts));
    Gs.push_back(at::empty({r, r}, opts));
    Ms.push_back(at::empty({r, r}, opts));
    PairView& pv = pairs[j];
    pv = PairView{};
    pv.A = A[j].data_ptr();
    pv.B = B[j].data_ptr();
    pv.U = basis_in(U[j], acc, keep);
    pv.m = m, pv.n = n, pv.r = r, pv.k = k;
    pv.P_out = Ps.back().data_ptr();
    pv.G_out = Gs.back().data_ptr();
    pv.M_out = Ms.back().data_ptr();
    offsets[j] = plan_scratch(pv, acc, false, total);
    bind_kernels<false>(pv, B[j].scalar_type());
  }
  at::Tensor fresh;
  uint8_t* scratch = call_scratch(total, fresh);
  for (size_t j = 0; j < npairs; ++j) place_scratch(pairs[j], offsets[j], scratch);
  run_pairs(pairs, Hyper{0, 0, 0, 0, 0, false}, Hyper{0, 0, 0, 0, 0, false});
  return {Ps, Gs, Ms};
}

// Checks the moments of pair j (math dtype `acc`, the shapes of A (r, n) and B (m, r)) and
// points `pv` at the pair's factors, moments and basis (U in the math dtype: converted into
// `keep` when it is not already). Gradients, step values, statistics outputs and scratch are
// the caller's.
void view_pair(PairView& pv, size_t j, const at::Tensor& A, const at::Tensor& B, const at::Tensor& exp_avg_A,
               const at::Tensor& exp_avg_sq_A, const at::Tensor& exp_avg_B, const at::Tensor& exp_avg_sq_B,
               const at::Tensor& U, int64_t m, int64_t n, int64_t r, int64_t k, at::ScalarType acc,
               std::vector<at::Tensor>& keep) {
  check_tensor(exp_avg_A, "exp_avg_A", j, {r, n}, acc, true);
  check_tensor(exp_avg_sq_A, "exp_avg_sq_A", j, {r, n}, acc, true);
  check_tensor(exp_avg_B, "exp_avg_B", j, {m, r}, acc, true);
  check_tensor(exp_avg_sq_B, "exp_avg_sq_B", j, {m, r}, acc, true);
  pv.A = A.data_ptr();
  pv.B = B.data_ptr();
  pv.exp_avg_A = exp_avg_A.data_ptr();
  pv.exp_avg_sq_A = exp_avg_sq_A.data_ptr();
  pv.exp_avg_B = exp_avg_B.data_ptr();
  pv.exp_avg_sq_B = exp_avg_sq_B.data_ptr();
  pv.U = basis_in(U, acc, keep);
  pv.m = m, pv.n = n, pv.r = r, pv.k = k;
}

// The lists of one fused call, in the op schema's order.
struct FusedArgs {
  at::TensorList A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, P, G, M, grad_A, grad_B, U, Q_B, R_B, H,
      step_A, step_B;
};

// Pairs of a validated fused call, ready to run.
struct FusedCall {
  std::vector<at::Tensor> keep;  // converted bases
  std::vector<PairView> pairs;
  std::vector<ScratchOffsets> offsets;
  int64_t total = 0;
};

// Validates every list entry of a fused call (nothing is written) and sets up its pairs.
// The step counters are already incremented; Q_B, R_B, H are inputs of any strides.
FusedCall prepare_fused(const FusedArgs& a) {
  const size_t npairs = a.A.size();
  const size_t sizes[] = {a.B.size(),      a.exp_avg_A.size(), a.exp_avg_sq_A.size(), a.exp_avg_B.size(),
                          a.exp_avg_sq_B.size(), a.P.size(),   a.G.size(),            a.M.size(),
                          a.grad_A.size(), a.grad_B.size(),    a.U.size(),            a.Q_B.size(),
                          a.R_B.size(),    a.H.size(),         a.step_A.size(),       a.step_B.size()};
  for (size_t s : sizes)
    TORCH_CHECK_VALUE(s == npairs, "asft::cpp: fused_anchored_adamw_ needs one entry per pair in every list; A has ",
                      npairs, ", another list has ", s);
  FusedCall call;
  call.pairs.resize(npairs);
  call.offsets.resize(npairs);
  for (size_t j = 0; j < npairs; ++j) {
    auto [m, n, r, k] = check_pair(a.U[j], a.B[j], a.A[j], j);
    const auto pt = a.B[j].scalar_type();
    const auto acc = acc_type(pt);
    check_tensor(a.grad_A[j], "grad_A", j, {r, n}, pt, true);
    check_tensor(a.grad_B[j], "grad_B", j, {m, r}, pt, true);
    PairView& pv = call.pairs[j];
    pv = PairView{};
    view_pair(pv, j, a.A[j], a.B[j], a.exp_avg_A[j], a.exp_avg_sq_A[j], a.exp_avg_B[j], a.exp_avg_sq_B[j], a.U[j], m,
              n, r, k, acc, call.keep);
    check_tensor(a.P[j], "P", j, {k, r}, acc, true);
    check_tensor(a.G[j], "G", j, {r, r}, acc, true);
    check_tensor(a.M[j], "M", j, {r, r}, acc, true);
    check_tensor(a.Q_B[j], "Q_B", j, {r, r}, acc, false);
    check_tensor(a.R_B[j], "R_B", j, {k, r}, acc, false);
    check_tensor(a.H[j], "H", j, {r, r}, acc, false);
    const double t_A = step_value(a.step_A[j], "step_A", j);
    const double t_B = step_value(a.step_B[j], "step_B", j);
    TORCH_CHECK_VALUE(t_A >= 1 && t_B >= 1, "asft::cpp: step_A[", j, "] and step_B[", j, "] must be >= 1",
                      " (already incremented), found ", t_A, " and ", t_B);
    pv.grad_A = a.grad_A[j].data_ptr();
    pv.grad_B = a.grad_B[j].data_ptr();
    pv.step_A = t_A;
    pv.step_B = t_B;
    pv.P_out = a.P[j].data_ptr();
    pv.G_out = a.G[j].data_ptr();
    pv.M_out = a.M[j].data_ptr();
    call.offsets[j] = plan_scratch(pv, acc, true, call.total);
    bind_kernels<true>(pv, pt);
  }
  return call;
}

// Runs a prepared fused call (Q_B, R_B, H already final) and bumps the version counters of
// everything it wrote.
void run_fused(FusedCall& call, const FusedArgs& a, const Hyper& hA, const Hyper& hB) {
  PHASE_START;
  // one allocation for every pair's weights and partial statistics
  at::Tensor fresh;
  uint8_t* scratch = call_scratch(call.total, fresh);
  for (size_t j = 0; j < call.pairs.size(); ++j) {
    PairView& pv = call.pairs[j];
    place_scratch(pv, call.offsets[j], scratch);
    if (acc_type(a.B[j].scalar_type()) == at::kDouble)
      fill_weights<double>(pv, a.Q_B[j], a.R_B[j], a.H[j]);
    else
      fill_weights<float>(pv, a.Q_B[j], a.R_B[j], a.H[j]);
  }
  PHASE_LAP(kPhasePrepare);
  run_pairs(call.pairs, hA, hB);
  // The kernels write through raw pointers; bump the version counters as in-place torch ops
  // would, so autograd and the optimizer's edit detection see the new values.
  for (at::TensorList list : {a.A, a.B, a.exp_avg_A, a.exp_avg_sq_A, a.exp_avg_B, a.exp_avg_sq_B, a.P, a.G, a.M})
    for (const at::Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
}

void fused_anchored_adamw_cpu(at::TensorList A, at::TensorList B, at::TensorList exp_avg_A,
                              at::TensorList exp_avg_sq_A, at::TensorList exp_avg_B, at::TensorList exp_avg_sq_B,
                              at::TensorList P, at::TensorList G, at::TensorList M, at::TensorList grad_A,
                              at::TensorList grad_B, at::TensorList U, at::TensorList Q_B, at::TensorList R_B,
                              at::TensorList H, at::TensorList step_A, at::TensorList step_B, double lr_A,
                              double beta1_A, double beta2_A, double eps_A, double weight_decay_A, bool maximize_A,
                              double lr_B, double beta1_B, double beta2_B, double eps_B, double weight_decay_B,
                              bool maximize_B) {
  PHASE_OP;
  const FusedArgs a{A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, P, G, M, grad_A, grad_B, U, Q_B, R_B,
                    H, step_A, step_B};
  PHASE_START;
  FusedCall call = prepare_fused(a);  // validates everything before anything is written
  PHASE_LAP(kPhasePrepare);
  run_fused(call, a, Hyper{lr_A, beta1_A, beta2_A, eps_A, weight_decay_A, maximize_A},
            Hyper{lr_B, beta1_B, beta2_B, eps_B, weight_decay_B, maximize_B});
}

// -------------------------------------------------------------------------- anchoring terms
// anchoring_terms_(P, G, M, w, coef, two_lam, Q_B, R_B, H) -> R, per pair j of a bucket with
// s = two_lam · coef[j] (coef absent: 1), Pw = diag(w) P:
//   H = s (G − Pᵀ Pw) (r, r),  Q_B = s M (r, r),  R_B = Pw Q_B (k, r),  R = ½ Σ_j ⟨H_j, M_j⟩.
// The matrices are tiny (r, k ≤ a few dozen): plain loops, one thread, every sum in a fixed
// order, replacing the ~7 dispatched torch ops per bucket of the eager math.
void check_terms_arg(const at::Tensor& t, const char* name, at::IntArrayRef shape, const char* symbols,
                     at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "asft::cpp: anchoring_terms_: ", name, " must be a CPU tensor, found ",
                    t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, "asft::cpp: anchoring_terms_: ", name, " must have shape ", symbols, " = ",
                    dims_str(shape), ", found ", shape_str(t));
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "asft::cpp: anchoring_terms_: ", name, " must be ", dtype,
                    " like P, found ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "asft::cpp: anchoring_terms_: ", name, " must be contiguous");
}

template <typename acc_t>
double anchoring_terms_kernel(int64_t L, int64_t k, int64_t r, const acc_t* P, const acc_t* G, const acc_t* M,
                              const acc_t* w, const acc_t* coef, int64_t coef_stride, double two_lam, acc_t* Q_B,
                              acc_t* R_B, acc_t* H) {
  // Both products by the register-tiled micro-kernels of the fused step (every entry summed
  // over its inner index in order), into rows padded to whole vectors:
  //   Pᵀ Pw = Σ_t P[t]ᵀ Pw[t]      (panel: X = P, Y = Pw, over the k rows)
  //   R_B   = Pw Q_B               (gemm_rows: rows of Pw broadcast, rows of Q_B loaded)
  constexpr int64_t lanes = Vec<acc_t>::size();
  const int64_t rp = round_up(r, lanes);
  // one buffer per thread, kept between calls (a fresh one would be page-faulted in each step)
  thread_local std::vector<acc_t> buf;
  const size_t need = static_cast<size_t>(k * r + 2 * r * rp + k * rp);
  if (buf.size() < need) buf.resize(need);
  acc_t* Pw = buf.data();     // (k, r)
  acc_t* PtPw = Pw + k * r;   // (r, rp)
  acc_t* Qp = PtPw + r * rp;  // (r, rp) Q_B, zero-padded columns
  acc_t* Rp = Qp + r * rp;    // (k, rp)
  double loss = 0;  // ½ Σ ⟨H, M⟩, accumulated in fp64 in pair order
  for (int64_t j = 0; j < L; ++j) {
    const acc_t* Pj = P + j * k * r;
    const acc_t* Gj = G + j * r * r;
    const acc_t* Mj = M + j * r * r;
    const acc_t* wj = w + j * k;
    acc_t* Qj = Q_B + j * r * r;
    acc_t* Rj = R_B + j * k * r;
    acc_t* Hj = H + j * r * r;
    const acc_t s = coef ? static_cast<acc_t>(two_lam) * coef[j * coef_stride] : static_cast<acc_t>(two_lam);
    for (int64_t t = 0; t < k; ++t)
      for (int64_t c = 0; c < r; ++c) Pw[t * r + c] = Pj[t * r + c] * wj[t];
    std::fill(PtPw, PtPw + r * rp, acc_t(0));
    panel<acc_t>(Pj, r, r, Pw, r, r, k, PtPw, rp);
    for (int64_t a = 0; a < r; ++a)
      for (int64_t b = 0; b < r; ++b) Hj[a * r + b] = s * (Gj[a * r + b] - PtPw[a * rp + b]);
    for (int64_t a = 0; a < r; ++a)
      for (int64_t b = 0; b < rp; ++b) {
        const acc_t q = b < r ? s * Mj[a * r + b] : acc_t(0);
        Qp[a * rp + b] = q;
        if (b < r) Qj[a * r + b] = q;
      }
    gemm_rows<acc_t>(Pw, r, r, Qp, nullptr, 0, 0, nullptr, rp, Rp, rp, k, rp);
    for (int64_t t = 0; t < k; ++t)
      for (int64_t b = 0; b < r; ++b) Rj[t * r + b] = Rp[t * rp + b];
    for (int64_t i = 0; i < r * r; ++i) loss += static_cast<double>(Hj[i]) * static_cast<double>(Mj[i]);
  }
  return 0.5 * loss;
}

at::Tensor anchoring_terms_cpu(const at::Tensor& P, const at::Tensor& G, const at::Tensor& M, const at::Tensor& w,
                               const std::optional<at::Tensor>& coef, double two_lam, const at::Tensor& Q_B,
                               const at::Tensor& R_B, const at::Tensor& H) {
  // Validate everything before anything is written.
  TORCH_CHECK_VALUE(P.dim() == 3, "asft::cpp: anchoring_terms_: P must be 3-d (L, k, r), found ", shape_str(P));
  const auto dt = P.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble, "asft::cpp: anchoring_terms_: P must be fp32/fp64, found ",
                    dt);
  const int64_t L = P.size(0), k = P.size(1), r = P.size(2);
  check_terms_arg(P, "P", {L, k, r}, "(L, k, r)", dt);
  check_terms_arg(G, "G", {L, r, r}, "(L, r, r)", dt);
  check_terms_arg(M, "M", {L, r, r}, "(L, r, r)", dt);
  check_terms_arg(w, "w", {L, k, 1}, "(L, k, 1)", dt);
  if (coef.has_value()) {
    const at::Tensor& c = *coef;
    TORCH_CHECK_VALUE(c.device().is_cpu(), "asft::cpp: anchoring_terms_: coef must be a CPU tensor, found ",
                      c.device());
    TORCH_CHECK_VALUE(c.sizes() == at::IntArrayRef({L, 1, 1}), "asft::cpp: anchoring_terms_: coef must have shape ",
                      "(L, 1, 1) = ", dims_str({L, 1, 1}), ", found ", shape_str(c));
    TORCH_CHECK_VALUE(c.scalar_type() == dt, "asft::cpp: anchoring_terms_: coef must be ", dt, " like P, found ",
                      c.scalar_type());
  }
  check_terms_arg(Q_B, "Q_B", {L, r, r}, "(L, r, r)", dt);
  check_terms_arg(R_B, "R_B", {L, k, r}, "(L, k, r)", dt);
  check_terms_arg(H, "H", {L, r, r}, "(L, r, r)", dt);
  at::Tensor loss = at::empty({}, P.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "asft_anchoring_terms", [&] {
    const scalar_t* cp = coef.has_value() ? coef->const_data_ptr<scalar_t>() : nullptr;
    const int64_t cs = coef.has_value() ? coef->stride(0) : 0;
    const double R = anchoring_terms_kernel<scalar_t>(
        L, k, r, P.const_data_ptr<scalar_t>(), G.const_data_ptr<scalar_t>(), M.const_data_ptr<scalar_t>(),
        w.const_data_ptr<scalar_t>(), cp, cs, two_lam, Q_B.data_ptr<scalar_t>(), R_B.data_ptr<scalar_t>(),
        H.data_ptr<scalar_t>());
    *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(R);
  });
  // written through raw pointers: bump the version counters as in-place torch ops would
  for (const at::Tensor* t : {&Q_B, &R_B, &H}) t->unsafeGetTensorImpl()->bump_version();
  return loss;
}


// ------------------------------------------------------------------------- the bucket step
// anchored_adamw_step_(A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, P, G, M, grad_A,
// grad_B, U, w, scale, counters, <A's and B's AdamW hyperparameters>, grad_scale, found_inf) -> R:
// the whole step of one bucket (L pairs of one rank r, basis size k and math dtype) in one call.
// P (L, k, r), G, M (L, r, r), w (L, k, 1), scale (L,) are stacked and contiguous in the math
// dtype; counters (2L,) holds A's step counters then B's (fp32/fp64, CPU, contiguous). After
// every input is validated: if found_inf holds a nonzero value nothing is written but the
// returned R; else the counters are advanced by one, the anchoring terms of each pair j
// (anchoring_terms_ with 2λ = scale[j]) are computed into the call's scratch, and the fused
// update runs with the task gradients multiplied by 1 / grad_scale (when given). Returns
// R = ½ Σ_j ⟨H_j, M_j⟩ at the statistics before the step (fp64 sum in pair order, stored in
// the math dtype).
void check_stacked(const at::Tensor& t, const char* name, at::IntArrayRef shape, const char* symbols,
                   at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "asft::cpp: anchored_adamw_step_: ", name, " must be a CPU tensor, found ",
                    t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, "asft::cpp: anchored_adamw_step_: ", name, " must have shape ", symbols,
                    " = ", dims_str(shape), ", found ", shape_str(t));
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "asft::cpp: anchored_adamw_step_: ", name, " must be ", dtype,
                    ", found ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "asft::cpp: anchored_adamw_step_: ", name, " must be contiguous");
}

// A GradScaler's 0-d fp32 CPU tensor (grad_scale, found_inf), read without a dispatched op.
double scaler_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == at::kFloat,
                    "asft::cpp: anchored_adamw_step_: ", name, " must be a one-element fp32 CPU tensor, found ",
                    t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
  return static_cast<double>(*t.const_data_ptr<float>());
}

// What a bucket step needs that stays the same from one step to the next: the pair views of
// the validated tensors (gradient pointers and step values filled in per call), their
// scratch layout and the converted bases. Built by validate_bucket, which checks every
// tensor but the gradients and writes nothing.
struct BucketCore {
  int64_t L = 0, k = 0, r = 0;
  at::ScalarType acc = at::kFloat;  // math dtype of P, G, M, w, scale and the moments
  at::ScalarType ct = at::kFloat;   // dtype of the counters
  std::vector<at::ScalarType> param_type;  // per pair
  std::vector<PairView> pairs;
  std::vector<ScratchOffsets> offsets;
  std::vector<at::Tensor> keep;  // bases converted to the math dtype
  int64_t total = 0;             // scratch bytes
};

BucketCore validate_bucket(at::TensorList A, at::TensorList B, at::TensorList exp_avg_A, at::TensorList exp_avg_sq_A,
                           at::TensorList exp_avg_B, at::TensorList exp_avg_sq_B, const at::Tensor& P,
                           const at::Tensor& G, const at::Tensor& M, at::TensorList U, const at::Tensor& w,
                           const at::Tensor& counters) {
  const size_t npairs = A.size();
  for (size_t s : {B.size(), exp_avg_A.size(), exp_avg_sq_A.size(), exp_avg_B.size(), exp_avg_sq_B.size(), U.size()})
    TORCH_CHECK_VALUE(s == npairs, "asft::cpp: anchored_adamw_step_ needs one entry per pair in every list; A has ",
                      npairs, ", another list has ", s);
  TORCH_CHECK_VALUE(P.dim() == 3 && P.size(0) == static_cast<int64_t>(npairs),
                    "asft::cpp: anchored_adamw_step_: P must be (L, k, r) with L = ", npairs, " pairs, found ",
                    shape_str(P));
  BucketCore core;
  const int64_t L = core.L = P.size(0), k = core.k = P.size(1), r = core.r = P.size(2);
  const auto acc = core.acc = P.scalar_type();
  TORCH_CHECK_VALUE(acc == at::kFloat || acc == at::kDouble, "asft::cpp: anchored_adamw_step_: P must be fp32/fp64, ",
                    "found ", acc);
  check_stacked(P, "P", {L, k, r}, "(L, k, r)", acc);
  check_stacked(G, "G", {L, r, r}, "(L, r, r)", acc);
  check_stacked(M, "M", {L, r, r}, "(L, r, r)", acc);
  check_stacked(w, "w", {L, k, 1}, "(L, k, 1)", acc);
  const auto ct = core.ct = counters.scalar_type();
  TORCH_CHECK_VALUE(ct == at::kFloat || ct == at::kDouble, "asft::cpp: anchored_adamw_step_: counters must be ",
                    "fp32/fp64, found ", ct);
  check_stacked(counters, "counters", {2 * L}, "(2L,)", ct);
  core.pairs.resize(npairs);
  core.offsets.resize(npairs);
  core.param_type.resize(npairs);
  uint8_t* Pp = static_cast<uint8_t*>(P.data_ptr());
  uint8_t* Gp = static_cast<uint8_t*>(G.data_ptr());
  uint8_t* Mp = static_cast<uint8_t*>(M.data_ptr());
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  for (size_t j = 0; j < npairs; ++j) {
    auto [m, n, rj, kj] = check_pair(U[j], B[j], A[j], j);
    TORCH_CHECK_VALUE(rj == r && kj == k, "asft::cpp: anchored_adamw_step_: pair ", j, " has r = ", rj, ", k = ", kj,
                      "; the bucket's P has r = ", r, ", k = ", k);
    const auto pt = core.param_type[j] = B[j].scalar_type();
    TORCH_CHECK_VALUE(acc_type(pt) == acc, "asft::cpp: anchored_adamw_step_: every pair needs the math dtype ", acc,
                      " of P, B[", j, "] is ", pt);
    PairView& pv = core.pairs[j];
    view_pair(pv, j, A[j], B[j], exp_avg_A[j], exp_avg_sq_A[j], exp_avg_B[j], exp_avg_sq_B[j], U[j], m, n, r, k, acc,
              core.keep);
    pv.P_out = Pp + j * k * r * elem;
    pv.G_out = Gp + j * r * r * elem;
    pv.M_out = Mp + j * r * r * elem;
    core.offsets[j] = plan_scratch(pv, acc, true, core.total);
    bind_kernels<true>(pv, pt);
  }
  return core;
}

// The per-step inputs of a validated bucket: the gradients (checked and pointed at), the
// step counters' values (t + 1) and the scale; nothing is written.
void bind_step_inputs(BucketCore& core, at::TensorList grad_A, at::TensorList grad_B, const at::Tensor& scale,
                      const at::Tensor& counters) {
  const size_t npairs = core.pairs.size();
  TORCH_CHECK_VALUE(grad_A.size() == npairs && grad_B.size() == npairs, "asft::cpp: anchored_adamw_step_ needs one ",
                    "gradient per pair; the bucket has ", npairs, " pairs, found ", grad_A.size(), " grad_A and ",
                    grad_B.size(), " grad_B");
  check_stacked(scale, "scale", {core.L}, "(L,)", core.acc);
  const uint8_t* cp = static_cast<const uint8_t*>(counters.const_data_ptr());
  const int64_t ct_elem = core.ct == at::kDouble ? 8 : 4;
  auto counter = [&](int64_t i) {
    const uint8_t* at_i = cp + i * ct_elem;
    return core.ct == at::kFloat ? static_cast<double>(*reinterpret_cast<const float*>(at_i))
                                 : *reinterpret_cast<const double*>(at_i);
  };
  for (size_t j = 0; j < npairs; ++j) {
    PairView& pv = core.pairs[j];
    const auto pt = core.param_type[j];
    check_tensor(grad_A[j], "grad_A", j, {pv.r, pv.n}, pt, true);
    check_tensor(grad_B[j], "grad_B", j, {pv.m, pv.r}, pt, true);
    const double t_A = counter(static_cast<int64_t>(j)) + 1.0, t_B = counter(core.L + static_cast<int64_t>(j)) + 1.0;
    TORCH_CHECK_VALUE(t_A >= 1 && t_B >= 1, "asft::cpp: anchored_adamw_step_: the counters of pair ", j,
                      " must be >= 0 (incremented by this op), found ", t_A - 1, " and ", t_B - 1);
    pv.grad_A = grad_A[j].const_data_ptr();
    pv.grad_B = grad_B[j].const_data_ptr();
    pv.step_A = t_A;
    pv.step_B = t_B;
  }
}

template <typename acc_t>
double bucket_step(BucketCore& core, const at::Tensor& P, const at::Tensor& G, const at::Tensor& M,
                   const at::Tensor& w, const at::Tensor& scale, const at::Tensor& counters, bool skip,
                   const Hyper& hA, const Hyper& hB) {
  const int64_t L = core.L, r = core.r, k = core.k;
  // the terms of every pair: Q_B (L, r, r), R_B (L, k, r), H (L, r, r), one buffer per thread
  thread_local std::vector<acc_t> terms;
  const size_t need = static_cast<size_t>(L * (2 * r * r + k * r));
  if (terms.size() < need) terms.resize(need);
  acc_t* Q = terms.data();
  acc_t* R = Q + L * r * r;
  acc_t* H = R + L * k * r;
  PHASE_START;
  const double loss = anchoring_terms_kernel<acc_t>(L, k, r, P.const_data_ptr<acc_t>(), G.const_data_ptr<acc_t>(),
                                                    M.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                                                    scale.const_data_ptr<acc_t>(), 1, 1.0, Q, R, H);
  PHASE_LAP(kPhaseTerms);
  if (skip) return loss;
  // ---- writes: the counters, then the fused pass
  if (core.ct == at::kFloat) {
    float* c = counters.data_ptr<float>();
    for (int64_t i = 0; i < 2 * L; ++i) c[i] += 1.0f;
  } else {
    double* c = counters.data_ptr<double>();
    for (int64_t i = 0; i < 2 * L; ++i) c[i] += 1.0;
  }
  at::Tensor fresh;
  uint8_t* scratch = call_scratch(core.total, fresh);
  for (int64_t j = 0; j < L; ++j) {
    PairView& pv = core.pairs[j];
    place_scratch(pv, core.offsets[j], scratch);
    fill_weights<acc_t>(pv, Q + j * r * r, r, 1, R + j * k * r, r, 1, H + j * r * r, r, 1);
  }
  PHASE_LAP(kPhasePrepare);
  run_pairs(core.pairs, hA, hB);
  return loss;
}

// Runs a bucket whose core and step inputs are bound: the scaler's tensors read, the step
// (or, on an inf, the terms only), R returned; the caller bumps the version counters.
at::Tensor run_bucket(BucketCore& core, const at::Tensor& P, const at::Tensor& G, const at::Tensor& M,
                      const at::Tensor& w, const at::Tensor& scale, const at::Tensor& counters, const Hyper& hA,
                      const Hyper& hB, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, bool& skip) {
  const double unscale = grad_scale.has_value() ? 1.0 / scaler_value(*grad_scale, "grad_scale") : 1.0;
  skip = found_inf.has_value() && scaler_value(*found_inf, "found_inf") != 0.0;
  Hyper a = hA, b = hB;
  a.unscale = b.unscale = unscale;
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(core.acc).device(at::kCPU));
  const bool no_write = skip;
  AT_DISPATCH_FLOATING_TYPES(core.acc, "asft_bucket_step", [&] {
    const double loss = bucket_step<scalar_t>(core, P, G, M, w, scale, counters, no_write, a, b);
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(loss);
  });
  return out;
}

// Written through raw pointers: bump the version counters as in-place torch ops would.
void bump_versions(std::initializer_list<at::TensorList> lists, std::initializer_list<const at::Tensor*> stacked) {
  for (at::TensorList list : lists)
    for (const at::Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
  for (const at::Tensor* t : stacked) t->unsafeGetTensorImpl()->bump_version();
}

at::Tensor anchored_adamw_step_cpu(at::TensorList A, at::TensorList B, at::TensorList exp_avg_A,
                                   at::TensorList exp_avg_sq_A, at::TensorList exp_avg_B,
                                   at::TensorList exp_avg_sq_B, const at::Tensor& P, const at::Tensor& G,
                                   const at::Tensor& M, at::TensorList grad_A, at::TensorList grad_B,
                                   at::TensorList U, const at::Tensor& w, const at::Tensor& scale,
                                   const at::Tensor& counters, double lr_A, double beta1_A, double beta2_A,
                                   double eps_A, double weight_decay_A, bool maximize_A, double lr_B, double beta1_B,
                                   double beta2_B, double eps_B, double weight_decay_B, bool maximize_B,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf) {
  PHASE_OP;
  PHASE_START;
  // every input validated before anything is written
  BucketCore core = validate_bucket(A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, P, G, M, U, w, counters);
  bind_step_inputs(core, grad_A, grad_B, scale, counters);
  PHASE_LAP(kPhasePrepare);
  bool skip = false;
  at::Tensor out = run_bucket(core, P, G, M, w, scale, counters,
                              Hyper{lr_A, beta1_A, beta2_A, eps_A, weight_decay_A, maximize_A},
                              Hyper{lr_B, beta1_B, beta2_B, eps_B, weight_decay_B, maximize_B}, grad_scale, found_inf,
                              skip);
  if (!skip) bump_versions({A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B}, {&P, &G, &M, &counters});
  return out;
}

// ------------------------------------------------------------------------ prepared buckets
// CpuBucket(A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, P, G, M, U, w, counters):
// a bucket validated once (the checks of anchored_adamw_step_ but the gradients'), holding its
// tensors and their pair views. Its method step(grad_A, grad_B, scale, <the 12 hyperparameters>,
// grad_scale, found_inf) -> R steps it exactly as anchored_adamw_step_ would with the same
// tensors, taking per call only what changes. Each call first re-checks by pointer that every
// held tensor still has the storage, dtype, shape and layout it was validated with (a
// `p.data = ...` swap, `resize_`, `set_`), and refuses to run otherwise.
//
// A method, not an op taking the object: calling an op with a script object from Python makes
// torch's Python wrapper walk every argument list for fake script objects, which costs more
// than the checks themselves at a few hundred pairs. The profiler sees the call as
// "asft::CpuBucket.step"; torch.compile and opcheck see anchored_adamw_step_, which runs the same
// code after validating everything itself.
struct CpuBucket : torch::CustomClassHolder {
  std::vector<at::Tensor> A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, U;
  at::Tensor P, G, M, w, counters;
  BucketCore core;
  // what every held tensor looked like when validated, in the order of held()
  std::vector<const void*> ptr;
  std::vector<at::ScalarType> dtype;
  std::vector<int64_t> sizes;  // concatenated
  std::vector<uint8_t> ndim;

  CpuBucket(std::vector<at::Tensor> A_, std::vector<at::Tensor> B_, std::vector<at::Tensor> exp_avg_A_,
            std::vector<at::Tensor> exp_avg_sq_A_, std::vector<at::Tensor> exp_avg_B_,
            std::vector<at::Tensor> exp_avg_sq_B_, at::Tensor P_, at::Tensor G_, at::Tensor M_,
            std::vector<at::Tensor> U_, at::Tensor w_, at::Tensor counters_)
      : A(std::move(A_)), B(std::move(B_)), exp_avg_A(std::move(exp_avg_A_)), exp_avg_sq_A(std::move(exp_avg_sq_A_)),
        exp_avg_B(std::move(exp_avg_B_)), exp_avg_sq_B(std::move(exp_avg_sq_B_)), U(std::move(U_)),
        P(std::move(P_)), G(std::move(G_)), M(std::move(M_)), w(std::move(w_)), counters(std::move(counters_)) {
    core = validate_bucket(A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, P, G, M, U, w, counters);
    for_each_held([&](const at::Tensor& t, const char*, size_t) {
      ptr.push_back(t.const_data_ptr());
      dtype.push_back(t.scalar_type());
      ndim.push_back(static_cast<uint8_t>(t.dim()));
      sizes.insert(sizes.end(), t.sizes().begin(), t.sizes().end());
    });
  }

  template <typename F>
  void for_each_held(F&& f) const {
    const std::pair<const std::vector<at::Tensor>*, const char*> lists[] = {
        {&A, "A"}, {&B, "B"}, {&exp_avg_A, "exp_avg_A"}, {&exp_avg_sq_A, "exp_avg_sq_A"},
        {&exp_avg_B, "exp_avg_B"}, {&exp_avg_sq_B, "exp_avg_sq_B"}, {&U, "U"}};
    for (const auto& [list, name] : lists)
      for (size_t j = 0; j < list->size(); ++j) f((*list)[j], name, j);
    f(P, "P", 0), f(G, "G", 0), f(M, "M", 0), f(w, "w", 0), f(counters, "counters", 0);
  }

  // The cheap re-check: addresses, dtypes, shapes and contiguity of every held tensor.
  void recheck() const {
    size_t i = 0, off = 0;
    for_each_held([&](const at::Tensor& t, const char* name, size_t j) {
      const at::IntArrayRef was(sizes.data() + off, ndim[i]);
      TORCH_CHECK_VALUE(t.const_data_ptr() == ptr[i] && t.scalar_type() == dtype[i] && t.sizes() == was &&
                            t.is_contiguous(),
                        "asft::cpp: CpuBucket.step: ", name, "[", j, "] is no longer the tensor the bucket was ",
                        "prepared with (its storage, dtype, shape or layout changed: now ", t.scalar_type(), " ",
                        shape_str(t), ", prepared as ", dtype[i], " ", dims_str(was),
                        "); prepare the bucket again");
      off += ndim[i++];
    });
  }

  at::Tensor step(at::TensorList grad_A, at::TensorList grad_B, const at::Tensor& scale, const Hyper& hA,
                  const Hyper& hB, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
    PHASE_OP;
    PHASE_START;
    recheck();
    bind_step_inputs(core, grad_A, grad_B, scale, counters);
    PHASE_LAP(kPhasePrepare);
    bool skip = false;
    at::Tensor out = run_bucket(core, P, G, M, w, scale, counters, hA, hB, grad_scale, found_inf, skip);
    if (!skip) bump_versions({A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B}, {&P, &G, &M, &counters});
    return out;
  }
};

}  // namespace

#ifdef ASFT_PHASE_CLOCK
// cpu_phase_clock(reset) -> (kPhaseCount,) fp64 seconds per phase since the last reset
// (summed over threads; kPhaseBlocks is the calling thread's wall time), in Phase order.
at::Tensor cpu_phase_clock(bool reset) {
  at::Tensor out = at::empty({kPhaseCount}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int p = 0; p < kPhaseCount; ++p)
    o[p] = 1e-9 * static_cast<double>(reset ? g_phase_ns[p].exchange(0) : g_phase_ns[p].load());
  return out;
}

TORCH_LIBRARY_FRAGMENT(asft, m) {
  m.def("cpu_phase_clock(bool reset=False) -> Tensor", &cpu_phase_clock);
}
#endif

TORCH_LIBRARY_FRAGMENT(asft, m) {
  m.class_<CpuBucket>("CpuBucket")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
                       at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>())
      .def("__len__", [](const c10::intrusive_ptr<CpuBucket>& self) { return self->core.L; })
      .def("step", [](const c10::intrusive_ptr<CpuBucket>& self, std::vector<at::Tensor> grad_A,
                      std::vector<at::Tensor> grad_B, at::Tensor scale, double lr_A, double beta1_A, double beta2_A,
                      double eps_A, double weight_decay_A, bool maximize_A, double lr_B, double beta1_B,
                      double beta2_B, double eps_B, double weight_decay_B, bool maximize_B,
                      std::optional<at::Tensor> grad_scale, std::optional<at::Tensor> found_inf) {
        RECORD_FUNCTION("asft::CpuBucket.step", std::vector<c10::IValue>());
        return self->step(grad_A, grad_B, scale, Hyper{lr_A, beta1_A, beta2_A, eps_A, weight_decay_A, maximize_A},
                          Hyper{lr_B, beta1_B, beta2_B, eps_B, weight_decay_B, maximize_B}, grad_scale, found_inf);
      });
}

TORCH_LIBRARY_IMPL(asft, CPU, m) {
  m.impl("stats_pass", &stats_pass_cpu);
  m.impl("fused_anchored_adamw_", &fused_anchored_adamw_cpu);
  m.impl("anchoring_terms_", &anchoring_terms_cpu);
  m.impl("anchored_adamw_step_", &anchored_adamw_step_cpu);
}

}  // namespace asft
