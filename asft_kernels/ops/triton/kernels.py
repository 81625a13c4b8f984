"""The Triton kernels of the backend; their docstrings hold the math.

Math (docs/method.md, per pair ``j``; ``Q_B = 2λ M``, ``R_B = 2λ diag(w) P M``,
``H = 2λ (G − Pᵀ diag(w) P)`` come precomputed from the optimizer)::

    rows of B (m, r):       g = grad_B + B Q_B − U R_B          U: (m, k)
    column blocks of A:     g = grad_A + H A                    A: (r, n)
    both:                   AdamW exactly as torch.optim.AdamW (decoupled weight decay)
    next statistics:        P' = Uᵀ B',  G' = B'ᵀ B',  M' = A' A'ᵀ   (from the stored B', A')

* :func:`_factor_kernel`, specialised by the constexpr ``FACTOR_A``: a program owns a
  *strip* of consecutive blocks (``BLOCK_ROWS`` rows of one B, or ``BLOCK_COLS`` columns of
  one A); with ``UPDATE`` it applies the anchoring gradient and AdamW, and it accumulates
  the strip's partial statistics in registers (P and G for B, M for A) and writes them once
  to a scratch buffer; with ``UPDATE=False`` it only computes the statistics (the stats
  pass);
* :func:`_reduce_kernel` sums the partials of every pair in a fixed order (strip 0, 1,
  …), so results are bitwise reproducible on a given GPU: no atomics anywhere;
* each program reads its pair's tensor addresses from an int64 table (fields below) and
  casts them with ``.to(tl.pointer_type(...))``, so all pairs of a bucket share a launch.

The kernels are plain functions wrapped by ``triton.jit`` on first launch (:func:`jitted`):
Triton decides at decoration time whether a function is compiled or interpreted, and tests
switch the interpreter on after this module is imported. They call only built-in ``tl``
functions for the same reason.
"""

from __future__ import annotations

import triton
import triton.language as tl

# fp32 tl.dot precision: "ieee" keeps results within ~1e-6 of the reference (tf32 would not).
DOT_PRECISION = "ieee"

# Fields of one row of the pair table (int64): addresses, then sizes. Kernel-visible
# globals must be ``tl.constexpr``; they index host lists as ints too.
_C = tl.constexpr
_B, _GRAD_B, _EXP_AVG_B, _EXP_AVG_SQ_B, _U, _Q_B, _R_B = (_C(i) for i in range(7))
_A, _GRAD_A, _EXP_AVG_A, _EXP_AVG_SQ_A, _H = (_C(i) for i in range(7, 12))
_M_ROWS, _N_COLS, _RANK, _K = (_C(i) for i in range(12, 16))
PAIR_FIELDS = _C(16)
# Fields of one row of the per-pair float table (fp32): bias corrections.
_STEP_SIZE_B, _BC2_SQRT_B, _STEP_SIZE_A, _BC2_SQRT_A = (_C(i) for i in range(4))
SCALAR_FIELDS = _C(4)
# Fields of one row of a tile table (int64): pair index, first row/column, number of
# blocks, scratch offset.
TILE_FIELDS = _C(4)
# Fields of one row of the reduction table (int64).
REDUCE_FIELDS = _C(5)
REDUCE_BLOCK = 256


def _interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run in the interpreter on CPU tensors."""
    return bool(triton.knobs.runtime.interpret)


def _factor_kernel(
    pairs,  # int64 (n_pairs, PAIR_FIELDS): addresses and sizes
    scalars,  # fp32 (n_pairs, SCALAR_FIELDS): lr/(1−β₁ᵗ) and √(1−β₂ᵗ) per factor
    tiles,  # int64 (n_programs, TILE_FIELDS): pair, first row/column, blocks, scratch offset
    scratch,  # fp32: partial statistics, one block per program
    decay,  # 1 − lr·weight_decay
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    grad_sign,  # −1 for maximize, else +1
    PARAM_DTYPE: tl.constexpr,
    U_DTYPE: tl.constexpr,
    FACTOR_A: tl.constexpr,
    UPDATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One strip of one pair: anchoring gradient + AdamW (``UPDATE``) and partial statistics.

    A program walks ``n_blocks`` consecutive blocks of its pair (a *strip*).

    * A (r, n), blocks of ``BLOCK_COLS`` columns: ``g = grad_A + H A``, AdamW, and
      ``M_s = A' A'ᵀ`` (r, r) of the strip, accumulated in registers.
    * B (m, r), blocks of ``BLOCK_ROWS`` rows. Phase 1, per block: ``g = grad_B + B Q_B −
      U R_B`` (U swept in chunks of ``BLOCK_K`` columns), AdamW, store, and ``G_s += B'ᵀ B'``.
      Phase 2, per chunk of ``BLOCK_K`` columns of U: ``P_s[chunk] = Σ_blocks U[rows, chunk]ᵀ
      B'[rows]``, reading back the B' just stored. The strip's U was read in phase 1 and is
      sized to stay in cache, so U comes from DRAM once.

    Partials go to the program's scratch block: ``P_s`` (k, r) then ``G_s`` (r, r) for B,
    ``M_s`` (r, r) for A. All math in fp32; the statistics use the values as stored
    (rounded to the parameter dtype).
    """
    program = tl.program_id(0)
    pair = tl.load(tiles + program * TILE_FIELDS)
    start = tl.load(tiles + program * TILE_FIELDS + 1)
    n_blocks = tl.load(tiles + program * TILE_FIELDS + 2)
    out = tl.load(tiles + program * TILE_FIELDS + 3)
    row = pairs + pair * PAIR_FIELDS
    r = tl.load(row + _RANK)
    m = tl.load(row + _M_ROWS)
    n = tl.load(row + _N_COLS)
    k = tl.load(row + _K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    # r×r matrices are row-major (contiguous).
    rr_idx = offs_r[:, None] * r + offs_r[None, :]
    rr_mask = mask_r[:, None] & mask_r[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    if FACTOR_A:
        param_ptr = tl.load(row + _A).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(row + _GRAD_A).to(tl.pointer_type(PARAM_DTYPE))
        exp_avg_ptr = tl.load(row + _EXP_AVG_A).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(row + _EXP_AVG_SQ_A).to(tl.pointer_type(tl.float32))
        step_size = tl.load(scalars + pair * SCALAR_FIELDS + _STEP_SIZE_A)
        bc2_sqrt = tl.load(scalars + pair * SCALAR_FIELDS + _BC2_SQRT_A)
        mix_ptr = tl.load(row + _H).to(tl.pointer_type(tl.float32))
    else:
        param_ptr = tl.load(row + _B).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(row + _GRAD_B).to(tl.pointer_type(PARAM_DTYPE))
        exp_avg_ptr = tl.load(row + _EXP_AVG_B).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(row + _EXP_AVG_SQ_B).to(tl.pointer_type(tl.float32))
        step_size = tl.load(scalars + pair * SCALAR_FIELDS + _STEP_SIZE_B)
        bc2_sqrt = tl.load(scalars + pair * SCALAR_FIELDS + _BC2_SQRT_B)
        mix_ptr = tl.load(row + _Q_B).to(tl.pointer_type(tl.float32))
        u_base = tl.load(row + _U).to(tl.pointer_type(U_DTYPE))
        rb_ptr = tl.load(row + _R_B).to(tl.pointer_type(tl.float32))
    if UPDATE:
        mix = tl.load(mix_ptr + rr_idx, mask=rr_mask, other=0.0)  # H (A) or Q_B (B)
    acc_stat = tl.full((BLOCK_R, BLOCK_R), 0.0, tl.float32)  # M (A) or G (B) of the strip

    for blk in range(0, n_blocks):
        if FACTOR_A:
            offs_c = start + blk * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
            idx = offs_r[:, None] * n + offs_c[None, :]  # (BLOCK_R, BLOCK_COLS)
            mask = mask_r[:, None] & (offs_c < n)[None, :]
        else:
            offs_m = start + blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            mask_m = offs_m < m
            idx = offs_m[:, None] * r + offs_r[None, :]  # (BLOCK_ROWS, BLOCK_R)
            mask = mask_m[:, None] & mask_r[None, :]
        x = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32)

        if UPDATE:
            g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if FACTOR_A:
                g = g + tl.dot(mix, x, input_precision=DOT_PRECISION)
            else:
                g = g + tl.dot(x, mix, input_precision=DOT_PRECISION)
                u_rb = tl.full((BLOCK_ROWS, BLOCK_R), 0.0, tl.float32)
                for k0 in range(0, k, BLOCK_K):
                    ck = k0 + offs_k
                    u = tl.load(u_base + offs_m[:, None] * k + ck[None, :],
                                mask=mask_m[:, None] & (ck < k)[None, :], other=0.0).to(tl.float32)
                    rb = tl.load(rb_ptr + ck[:, None] * r + offs_r[None, :],
                                 mask=(ck < k)[:, None] & mask_r[None, :], other=0.0)
                    u_rb = tl.dot(u, rb, u_rb, input_precision=DOT_PRECISION)
                g = g - u_rb
            # AdamW, operation by operation as torch.optim.AdamW (single-tensor path).
            g = g * grad_sign
            exp_avg = tl.load(exp_avg_ptr + idx, mask=mask, other=0.0)
            exp_avg_sq = tl.load(exp_avg_sq_ptr + idx, mask=mask, other=0.0)
            x = x * decay
            exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg)
            exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g
            denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bc2_sqrt) + eps
            x = x - step_size * tl.div_rn(exp_avg, denom)
            tl.store(exp_avg_ptr + idx, exp_avg, mask=mask)
            tl.store(exp_avg_sq_ptr + idx, exp_avg_sq, mask=mask)
            if PARAM_DTYPE == tl.bfloat16:
                # Round to nearest even explicitly: the interpreter's fp32 -> bf16 cast truncates.
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
            stored = x.to(PARAM_DTYPE)
            tl.store(param_ptr + idx, stored, mask=mask)
            # The statistics describe the parameters as stored, after rounding.
            x = tl.where(mask, stored.to(tl.float32), 0.0)

        if FACTOR_A:
            acc_stat = tl.dot(x, tl.trans(x), acc_stat, input_precision=DOT_PRECISION)
        else:
            acc_stat = tl.dot(tl.trans(x), x, acc_stat, input_precision=DOT_PRECISION)

    if FACTOR_A:
        tl.store(scratch + out + rr_idx, acc_stat, mask=rr_mask)
    else:
        tl.store(scratch + out + k * r + rr_idx, acc_stat, mask=rr_mask)
        # Phase 2 reads back rows of B' stored by other threads of this program.
        tl.debug_barrier()
        for k0 in range(0, k, BLOCK_K):
            ck = k0 + offs_k
            acc_p = tl.full((BLOCK_K, BLOCK_R), 0.0, tl.float32)
            for blk in range(0, n_blocks):
                offs_m = start + blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
                mask_m = offs_m < m
                x = tl.load(param_ptr + offs_m[:, None] * r + offs_r[None, :],
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
                u = tl.load(u_base + offs_m[:, None] * k + ck[None, :],
                            mask=mask_m[:, None] & (ck < k)[None, :], other=0.0).to(tl.float32)
                acc_p = tl.dot(tl.trans(u), x, acc_p, input_precision=DOT_PRECISION)
            tl.store(scratch + out + ck[:, None] * r + offs_r[None, :], acc_p,
                     mask=(ck < k)[:, None] & mask_r[None, :])


def _reduce_kernel(
    jobs,  # int64 (n_jobs, REDUCE_FIELDS): destination address, source offset, tile stride, numel, n_tiles
    scratch,  # fp32 partial statistics
    BLOCK: tl.constexpr,
):
    """``dest[e] = Σ_t scratch[src + t·stride + e]`` for ``t = 0, 1, …`` in that order
    (deterministic: no atomics, a fixed summation order)."""
    job = tl.program_id(0)
    block = tl.program_id(1)
    base = jobs + job * REDUCE_FIELDS
    dest = tl.load(base).to(tl.pointer_type(tl.float32))
    src = tl.load(base + 1)
    stride = tl.load(base + 2)
    numel = tl.load(base + 3)
    n_tiles = tl.load(base + 4)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    # Blocks past the end of a small output do no work.
    n_tiles = tl.where(block * BLOCK < numel, n_tiles, 0)
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for t in range(0, n_tiles):
        acc += tl.load(scratch + src + t * stride + offs, mask=mask, other=0.0)
    tl.store(dest + offs, acc, mask=mask)


_JIT_CACHE: dict[tuple[str, bool], object] = {}


def jitted(fn):
    """``triton.jit(fn)`` for the current mode (compiled, or interpreted when
    ``TRITON_INTERPRET=1``), created once per mode."""
    key = (fn.__name__, _interpreting())
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = triton.jit(fn)
    return _JIT_CACHE[key]
