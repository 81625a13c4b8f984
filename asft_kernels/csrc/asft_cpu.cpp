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
// with P', G', M' accumulated from the values as stored (after rounding to the param dtype).
//
// Work decomposition. Every pair is cut into row blocks of B (kRowBlock rows) and column
// blocks of A (kColBlock columns); the cut depends only on the shapes. All blocks of all
// pairs form one task list, run by at::parallel_for workers that pull tasks from a shared
// counter (dynamic load balance across pairs of different sizes: one grouped launch per
// step). Each task writes its own partial statistics; a second pass sums the partials of
// each pair in block order. Hence the results are bitwise identical for any thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace asft {
namespace {

constexpr int64_t kRowBlock = 128;  // rows of B per task
constexpr int64_t kColBlock = 256;  // columns of A per task (multiple of kLanes)
constexpr int64_t kLanes = 8;       // independent partial sums in the A Aᵀ dot products

// AdamW hyperparameters, as torch.optim.AdamW derives them (double, then the math dtype).
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
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
  const void* Q_B;
  const void* R_B;
  const void* H;
  int64_t m, n, r, k;
  double step_A, step_B;
  void* P_part;  // (row_blocks, k, r)
  void* G_part;  // (row_blocks, r, r)
  void* M_part;  // (col_blocks, r, r)
  void* P_out;   // (k, r)
  void* G_out;   // (r, r)
  void* M_out;   // (r, r)
  int64_t row_blocks, col_blocks;
  void (*row_block)(const PairView&, const Hyper&, int64_t);
  void (*col_block)(const PairView&, const Hyper&, int64_t);
  void (*reduce)(const PairView&);
};

// ---------------------------------------------------------------------------------- B rows
// A tile of T consecutive rows of B. R > 0: the rank is a compile-time constant (the inner
// loops over r become whole SIMD registers); R == 0: runtime rank.
template <typename param_t, typename acc_t, int R, int T, bool kUpdate>
inline void b_row_tile(const PairView& pv, const StepScalars<acc_t>* s, int64_t i, acc_t* __restrict b,
                       acc_t* __restrict bq, acc_t* __restrict ur, acc_t* __restrict P, acc_t* __restrict G) {
  const int64_t r = R > 0 ? R : pv.r;
  const int64_t k = pv.k;
  param_t* __restrict Bp = static_cast<param_t*>(pv.B) + i * r;
  const acc_t* __restrict U = static_cast<const acc_t*>(pv.U) + i * k;

  for (int j = 0; j < T; ++j) {
#pragma omp simd
    for (int64_t c = 0; c < r; ++c) b[j * r + c] = static_cast<acc_t>(Bp[j * r + c]);
  }

  if constexpr (kUpdate) {
    const acc_t* __restrict Q = static_cast<const acc_t*>(pv.Q_B);
    const acc_t* __restrict RB = static_cast<const acc_t*>(pv.R_B);
    // bq = B[i] Q_B
    for (int64_t x = 0; x < T * r; ++x) bq[x] = acc_t(0);
    for (int64_t d = 0; d < r; ++d) {
      for (int j = 0; j < T; ++j) {
        const acc_t bd = b[j * r + d];
#pragma omp simd
        for (int64_t c = 0; c < r; ++c) bq[j * r + c] += bd * Q[d * r + c];
      }
    }
    // ur = U[i] R_B
    for (int64_t x = 0; x < T * r; ++x) ur[x] = acc_t(0);
    for (int64_t t = 0; t < k; ++t) {
      for (int j = 0; j < T; ++j) {
        const acc_t u = U[j * k + t];
#pragma omp simd
        for (int64_t c = 0; c < r; ++c) ur[j * r + c] += u * RB[t * r + c];
      }
    }
    const param_t* __restrict gB = static_cast<const param_t*>(pv.grad_B) + i * r;
    acc_t* __restrict mB = static_cast<acc_t*>(pv.exp_avg_B) + i * r;
    acc_t* __restrict vB = static_cast<acc_t*>(pv.exp_avg_sq_B) + i * r;
#pragma omp simd
    for (int64_t x = 0; x < T * r; ++x) {
      const acc_t g = s->sign * ((static_cast<acc_t>(gB[x]) + bq[x]) - ur[x]);
      b[x] = adamw_element<param_t, acc_t>(Bp[x], mB[x], vB[x], g, *s);
    }
  }

  // P += U[i]ᵀ B[i], rows of the tile added in order
  for (int64_t t = 0; t < k; ++t) {
    acc_t* __restrict Pt = P + t * r;
    for (int j = 0; j < T; ++j) {
      const acc_t u = U[j * k + t];
#pragma omp simd
      for (int64_t c = 0; c < r; ++c) Pt[c] += u * b[j * r + c];
    }
  }
  // G += B[i]ᵀ B[i]
  for (int64_t d = 0; d < r; ++d) {
    for (int j = 0; j < T; ++j) {
      const acc_t bd = b[j * r + d];
#pragma omp simd
      for (int64_t c = 0; c < r; ++c) G[d * r + c] += bd * b[j * r + c];
    }
  }
}

template <typename param_t, typename acc_t, int R, bool kUpdate>
void b_row_block(const PairView& pv, const Hyper& h, int64_t blk) {
  constexpr int T = R == 0 ? 4 : R <= 8 ? 8 : R <= 16 ? 4 : 2;  // rows per tile: T·R accumulators fit the registers
  const int64_t r = R > 0 ? R : pv.r;
  const int64_t k = pv.k;
  const int64_t i0 = blk * kRowBlock;
  const int64_t i1 = std::min(pv.m, i0 + kRowBlock);
  acc_t* P = static_cast<acc_t*>(pv.P_part) + blk * k * r;
  acc_t* G = static_cast<acc_t*>(pv.G_part) + blk * r * r;
  std::fill(P, P + k * r, acc_t(0));
  std::fill(G, G + r * r, acc_t(0));
  std::optional<StepScalars<acc_t>> s;
  if constexpr (kUpdate) s.emplace(h, pv.step_B);

  constexpr int64_t kStatic = R > 0 ? T * R : 1;
  alignas(64) acc_t b_s[kStatic], bq_s[kStatic], ur_s[kStatic];
  c10::SmallVector<acc_t, 1> heap;
  acc_t *b = b_s, *bq = bq_s, *ur = ur_s;
  if constexpr (R == 0) {
    heap.resize(3 * T * r);
    b = heap.data();
    bq = b + T * r;
    ur = bq + T * r;
  }
  // U dominates the bytes of a block; ask for the next tile's rows while this tile computes
  // (hardware prefetchers follow one stream, a tile reads T)
  const acc_t* U = static_cast<const acc_t*>(pv.U);
  constexpr int64_t kLine = 64 / sizeof(acc_t);
  auto prefetch_rows = [&](int64_t row, int64_t rows) {
    const acc_t* begin = U + row * k;
    for (int64_t x = 0; x < rows * k; x += kLine) __builtin_prefetch(begin + x, 0, 3);
  };
  int64_t i = i0;
  prefetch_rows(i, std::min<int64_t>(T, i1 - i));
  for (; i + T <= i1; i += T) {
    if (i + 2 * T <= i1) prefetch_rows(i + T, T);
    b_row_tile<param_t, acc_t, R, T, kUpdate>(pv, s ? &*s : nullptr, i, b, bq, ur, P, G);
  }
  for (; i < i1; ++i) b_row_tile<param_t, acc_t, R, 1, kUpdate>(pv, s ? &*s : nullptr, i, b, bq, ur, P, G);
}

// ------------------------------------------------------------------------------- A columns
// ha[d0 + i, x0 : x0 + CW] = Σ_e H[d0 + i, e] a[e, x0 : x0 + CW] for TD rows at once: the TD×CW
// accumulators stay in registers while the rows of `a` stream through once.
template <typename acc_t, int TD, int CW>
inline void ha_tile(const acc_t* __restrict H, const acc_t* __restrict a, acc_t* __restrict ha, int64_t r,
                    int64_t W, int64_t d0, int64_t x0) {
  acc_t acc[TD][CW] = {};
  for (int64_t e = 0; e < r; ++e) {
    const acc_t* ae = a + e * W + x0;
    for (int i = 0; i < TD; ++i) {
      const acc_t hde = H[(d0 + i) * r + e];
#pragma omp simd
      for (int x = 0; x < CW; ++x) acc[i][x] += hde * ae[x];
    }
  }
  for (int i = 0; i < TD; ++i)
    for (int x = 0; x < CW; ++x) ha[(d0 + i) * W + x0 + x] = acc[i][x];
}

// lanes[d0 + i][e0 + j][l] = Σ_x a[d0 + i, x·kLanes + l] a[e0 + j, x·kLanes + l]: each entry
// of A Aᵀ is kLanes sequential partial sums, whatever the tile it was computed in.
template <typename acc_t, int TD, int TE>
inline void gram_tile(const acc_t* __restrict a, int64_t W, int64_t wpad, int64_t d0, int64_t e0, int64_t r,
                      acc_t* __restrict M) {
  acc_t acc[TD][TE][kLanes] = {};
  for (int64_t x = 0; x < wpad; x += kLanes) {
    for (int i = 0; i < TD; ++i) {
      const acc_t* ad = a + (d0 + i) * W + x;
      for (int j = 0; j < TE; ++j) {
        const acc_t* ae = a + (e0 + j) * W + x;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) acc[i][j][l] += ad[l] * ae[l];
      }
    }
  }
  for (int i = 0; i < TD; ++i) {
    for (int j = 0; j < TE; ++j) {
      const acc_t* L = acc[i][j];
      const acc_t sum = ((L[0] + L[1]) + (L[2] + L[3])) + ((L[4] + L[5]) + (L[6] + L[7]));
      M[(d0 + i) * r + e0 + j] = sum;
      M[(e0 + j) * r + d0 + i] = sum;
    }
  }
}

template <typename param_t, typename acc_t, bool kUpdate>
void a_col_block(const PairView& pv, const Hyper& h, int64_t blk) {
  constexpr int64_t W = kColBlock;
  constexpr int CW = 64 / sizeof(acc_t);  // columns per register tile (two AVX2 registers)
  static_assert(W % CW == 0 && CW % kLanes == 0, "column block must hold whole tiles");
  const int64_t r = pv.r, n = pv.n;
  const int64_t c0 = blk * W;
  const int64_t w = std::min(W, n - c0);
  const int64_t wpad = (w + CW - 1) / CW * CW;
  // a: (r, W) block of A in the math dtype, zero-padded to whole tiles; ha: (r, W) H A
  std::vector<acc_t> buf(static_cast<size_t>((kUpdate ? 2 : 1) * r * W));
  acc_t* __restrict a = buf.data();
  param_t* __restrict Ap = static_cast<param_t*>(pv.A);
  for (int64_t d = 0; d < r; ++d) {
    const param_t* src = Ap + d * n + c0;
    acc_t* dst = a + d * W;
#pragma omp simd
    for (int64_t x = 0; x < w; ++x) dst[x] = static_cast<acc_t>(src[x]);
    for (int64_t x = w; x < wpad; ++x) dst[x] = acc_t(0);
  }

  if constexpr (kUpdate) {
    const StepScalars<acc_t> s(h, pv.step_A);
    const acc_t* __restrict H = static_cast<const acc_t*>(pv.H);
    const param_t* __restrict gA = static_cast<const param_t*>(pv.grad_A);
    acc_t* __restrict mA = static_cast<acc_t*>(pv.exp_avg_A);
    acc_t* __restrict vA = static_cast<acc_t*>(pv.exp_avg_sq_A);
    acc_t* __restrict ha = a + r * W;
    for (int64_t x0 = 0; x0 < wpad; x0 += CW) {
      int64_t d0 = 0;
      for (; d0 + 4 <= r; d0 += 4) ha_tile<acc_t, 4, CW>(H, a, ha, r, W, d0, x0);
      for (; d0 < r; ++d0) ha_tile<acc_t, 1, CW>(H, a, ha, r, W, d0, x0);
    }
    // `a` is no longer needed as input: it receives the stored new values
    for (int64_t d = 0; d < r; ++d) {
      const int64_t off = d * n + c0;
      const acc_t* had = ha + d * W;
      acc_t* out = a + d * W;
#pragma omp simd
      for (int64_t x = 0; x < w; ++x) {
        const acc_t g = s.sign * (static_cast<acc_t>(gA[off + x]) + had[x]);
        out[x] = adamw_element<param_t, acc_t>(Ap[off + x], mA[off + x], vA[off + x], g, s);
      }
    }
  }

  // M += A[:, block] A[:, block]ᵀ over tiles on and below the diagonal
  acc_t* M = static_cast<acc_t*>(pv.M_part) + blk * r * r;
  int64_t d0 = 0;
  for (; d0 + 4 <= r; d0 += 4) {
    int64_t e0 = 0;
    for (; e0 + 2 <= d0 + 4; e0 += 2) gram_tile<acc_t, 4, 2>(a, W, wpad, d0, e0, r, M);
    for (; e0 < d0 + 4; ++e0) gram_tile<acc_t, 4, 1>(a, W, wpad, d0, e0, r, M);
  }
  for (; d0 < r; ++d0) {
    int64_t e0 = 0;
    for (; e0 + 2 <= d0 + 1; e0 += 2) gram_tile<acc_t, 1, 2>(a, W, wpad, d0, e0, r, M);
    for (; e0 <= d0; ++e0) gram_tile<acc_t, 1, 1>(a, W, wpad, d0, e0, r, M);
  }
}

// Sum the partials of one pair in block order into its (k, r) / (r, r) outputs.
template <typename acc_t>
void reduce_pair(const PairView& pv) {
  auto sum_blocks = [](const acc_t* part, int64_t blocks, int64_t size, acc_t* out) {
    std::fill(out, out + size, acc_t(0));
    for (int64_t b = 0; b < blocks; ++b) {
      const acc_t* src = part + b * size;
#pragma omp simd
      for (int64_t x = 0; x < size; ++x) out[x] += src[x];
    }
  };
  const int64_t k = pv.k, r = pv.r;
  sum_blocks(static_cast<const acc_t*>(pv.P_part), pv.row_blocks, k * r, static_cast<acc_t*>(pv.P_out));
  sum_blocks(static_cast<const acc_t*>(pv.G_part), pv.row_blocks, r * r, static_cast<acc_t*>(pv.G_out));
  sum_blocks(static_cast<const acc_t*>(pv.M_part), pv.col_blocks, r * r, static_cast<acc_t*>(pv.M_out));
}

template <typename param_t, bool kUpdate>
void select_kernels(PairView& pv) {
  using acc_t = at::opmath_type<param_t>;
  switch (pv.r) {
    case 4: pv.row_block = &b_row_block<param_t, acc_t, 4, kUpdate>; break;
    case 8: pv.row_block = &b_row_block<param_t, acc_t, 8, kUpdate>; break;
    case 16: pv.row_block = &b_row_block<param_t, acc_t, 16, kUpdate>; break;
    case 32: pv.row_block = &b_row_block<param_t, acc_t, 32, kUpdate>; break;
    default: pv.row_block = &b_row_block<param_t, acc_t, 0, kUpdate>; break;
  }
  pv.col_block = &a_col_block<param_t, acc_t, kUpdate>;
  pv.reduce = &reduce_pair<acc_t>;
}

// Run every block of every pair, then every reduction. Deterministic: see the file header.
void run_pairs(std::vector<PairView>& pairs, const Hyper& h) {
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

  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) {
      const Task& task = tasks[t];
      const PairView& pv = pairs[task.pair];
      if (task.is_row)
        pv.row_block(pv, h, task.blk);
      else
        pv.col_block(pv, h, task.blk);
    }
  });
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) pairs[j].reduce(pairs[j]);
  });
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

// U in the math dtype, contiguous (a copy only for a bf16 basis or a strided view).
at::Tensor basis_in(const at::Tensor& U, at::ScalarType acc) { return U.to(acc).contiguous(); }

template <bool kUpdate>
void bind_kernels(PairView& pv, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "asft_cpu", [&] {
    select_kernels<scalar_t, kUpdate>(pv);
  });
}

void alloc_partials(PairView& pv, at::ScalarType acc, std::vector<at::Tensor>& keep) {
  pv.row_blocks = (pv.m + kRowBlock - 1) / kRowBlock;
  pv.col_blocks = (pv.n + kColBlock - 1) / kColBlock;
  auto opts = at::TensorOptions().dtype(acc).device(at::kCPU);
  keep.push_back(at::empty({pv.row_blocks * pv.k * pv.r}, opts));
  pv.P_part = keep.back().data_ptr();
  keep.push_back(at::empty({pv.row_blocks * pv.r * pv.r}, opts));
  pv.G_part = keep.back().data_ptr();
  keep.push_back(at::empty({pv.col_blocks * pv.r * pv.r}, opts));
  pv.M_part = keep.back().data_ptr();
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
  for (size_t j = 0; j < npairs; ++j) {
    auto [m, n, r, k] = check_pair(U[j], B[j], A[j], j);
    const auto acc = acc_type(B[j].scalar_type());
    auto opts = at::TensorOptions().dtype(acc).device(at::kCPU);
    Ps.push_back(at::empty({k, r}, opts));
    Gs.push_back(at::empty({r, r}, opts));
    Ms.push_back(at::empty({r, r}, opts));
    keep.push_back(basis_in(U[j], acc));
    PairView& pv = pairs[j];
    pv = PairView{};
    pv.A = A[j].data_ptr();
    pv.B = B[j].data_ptr();
    pv.U = keep.back().data_ptr();
    pv.m = m, pv.n = n, pv.r = r, pv.k = k;
    pv.P_out = Ps.back().data_ptr();
    pv.G_out = Gs.back().data_ptr();
    pv.M_out = Ms.back().data_ptr();
    alloc_partials(pv, acc, keep);
    bind_kernels<false>(pv, B[j].scalar_type());
  }
  run_pairs(pairs, Hyper{0, 0, 0, 0, 0, false});
  return {Ps, Gs, Ms};
}

void fused_anchored_adamw_cpu(at::TensorList A, at::TensorList B, at::TensorList exp_avg_A,
                              at::TensorList exp_avg_sq_A, at::TensorList exp_avg_B, at::TensorList exp_avg_sq_B,
                              at::TensorList P, at::TensorList G, at::TensorList M, at::TensorList grad_A,
                              at::TensorList grad_B, at::TensorList U, at::TensorList Q_B, at::TensorList R_B,
                              at::TensorList H, at::TensorList step_A, at::TensorList step_B, double lr,
                              double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  const size_t npairs = A.size();
  const size_t sizes[] = {B.size(),      exp_avg_A.size(), exp_avg_sq_A.size(), exp_avg_B.size(), exp_avg_sq_B.size(),
                          P.size(),      G.size(),         M.size(),            grad_A.size(),    grad_B.size(),
                          U.size(),      Q_B.size(),       R_B.size(),          H.size(),         step_A.size(),
                          step_B.size()};
  for (size_t s : sizes)
    TORCH_CHECK_VALUE(s == npairs, "asft::cpp: fused_anchored_adamw_ needs one entry per pair in every list; A has ",
                      npairs, ", another list has ", s);

  // Validate everything before anything is written.
  std::vector<at::Tensor> keep;
  std::vector<PairView> pairs(npairs);
  for (size_t j = 0; j < npairs; ++j) {
    auto [m, n, r, k] = check_pair(U[j], B[j], A[j], j);
    const auto pt = B[j].scalar_type();
    const auto acc = acc_type(pt);
    check_tensor(grad_A[j], "grad_A", j, {r, n}, pt, true);
    check_tensor(grad_B[j], "grad_B", j, {m, r}, pt, true);
    check_tensor(exp_avg_A[j], "exp_avg_A", j, {r, n}, acc, true);
    check_tensor(exp_avg_sq_A[j], "exp_avg_sq_A", j, {r, n}, acc, true);
    check_tensor(exp_avg_B[j], "exp_avg_B", j, {m, r}, acc, true);
    check_tensor(exp_avg_sq_B[j], "exp_avg_sq_B", j, {m, r}, acc, true);
    check_tensor(P[j], "P", j, {k, r}, acc, true);
    check_tensor(G[j], "G", j, {r, r}, acc, true);
    check_tensor(M[j], "M", j, {r, r}, acc, true);
    check_tensor(Q_B[j], "Q_B", j, {r, r}, acc, false);
    check_tensor(R_B[j], "R_B", j, {k, r}, acc, false);
    check_tensor(H[j], "H", j, {r, r}, acc, false);
    const double t_A = step_value(step_A[j], "step_A", j);
    const double t_B = step_value(step_B[j], "step_B", j);
    TORCH_CHECK_VALUE(t_A >= 1 && t_B >= 1, "asft::cpp: step_A[", j, "] and step_B[", j,
                      "] must be >= 1 (already incremented), found ", t_A, " and ", t_B);

    PairView& pv = pairs[j];
    pv = PairView{};
    pv.A = A[j].data_ptr();
    pv.B = B[j].data_ptr();
    pv.grad_A = grad_A[j].data_ptr();
    pv.grad_B = grad_B[j].data_ptr();
    pv.exp_avg_A = exp_avg_A[j].data_ptr();
    pv.exp_avg_sq_A = exp_avg_sq_A[j].data_ptr();
    pv.exp_avg_B = exp_avg_B[j].data_ptr();
    pv.exp_avg_sq_B = exp_avg_sq_B[j].data_ptr();
    keep.push_back(basis_in(U[j], acc));
    pv.U = keep.back().data_ptr();
    keep.push_back(Q_B[j].contiguous());
    pv.Q_B = keep.back().data_ptr();
    keep.push_back(R_B[j].contiguous());
    pv.R_B = keep.back().data_ptr();
    keep.push_back(H[j].contiguous());
    pv.H = keep.back().data_ptr();
    pv.m = m, pv.n = n, pv.r = r, pv.k = k;
    pv.step_A = t_A;
    pv.step_B = t_B;
    pv.P_out = P[j].data_ptr();
    pv.G_out = G[j].data_ptr();
    pv.M_out = M[j].data_ptr();
    alloc_partials(pv, acc, keep);
    bind_kernels<true>(pv, pt);
  }
  run_pairs(pairs, Hyper{lr, beta1, beta2, eps, weight_decay, maximize});
  // The kernels write through raw pointers; bump the version counters as in-place torch ops
  // would, so autograd and the optimizer's edit detection see the new values.
  for (at::TensorList list : {A, B, exp_avg_A, exp_avg_sq_A, exp_avg_B, exp_avg_sq_B, P, G, M})
    for (const at::Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(asft, CPU, m) {
  m.impl("stats_pass", &stats_pass_cpu);
  m.impl("fused_anchored_adamw_", &fused_anchored_adamw_cpu);
}

}  // namespace asft
