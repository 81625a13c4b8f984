"""Work layout of the Triton kernels: block sizes and launch options, padded ranks, strips,
and the DRAM byte model of a fused step.

Pairs are bucketed by (parameter dtype, U dtype, padded rank 16 or 64). Within a bucket the
rows of every B and the columns of every A are cut into blocks, and consecutive blocks of
one pair into *strips*, one program each. The strip length balances the number of
programs, the partial statistics to write, and keeping the strip's U in cache for B's
second phase (:func:`strip_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import triton

from .kernels import TILE_FIELDS

# Largest LoRA rank handled by the kernels; larger ranks are routed to the eager backend
# (at r = 128 the r×r tiles spill registers even at the smallest tile).
MAX_TRITON_RANK = 64


def kernel_config(block_r: int, factor_a: bool, update: bool = True) -> dict:
    """Launch configuration of :func:`.kernels._factor_kernel` for a padded rank ``block_r``
    (16 or 64): the block sizes (constexprs) and the launch options ``num_warps``,
    ``num_stages``, ``enable_fp_fusion`` and, for the stats pass and the B update, ``maxnreg``.

    fp32 ``tl.dot`` with ``ieee`` precision runs on FMA units and keeps its operands in
    registers, so blocks are small. Every configuration compiles without spilling to local
    memory for sm_80 and sm_90 on each supported Triton (checked by
    ``tests/test_triton_aot.py``; figures in docs/triton.md):

    * ``num_stages`` is stated for every variant, so the register budget does not move
      with Triton's default. The A update at padded rank 64 uses 2 stages: with 3, Triton
      3.6 needs more than the 128 registers a thread of a 16-warp program can have and
      spills (264 bytes on sm_80); 2 stages fit on 3.6 and 3.9. 1 stage would fit too but
      gives up overlapping the next block's loads with the current block's math.
    * ptxas picks 64 registers for a 16-warp stats variant and spills, so the stats pass
      states the per-thread share of the register file (``maxnreg``) explicitly; at padded
      rank 64 it runs 8 warps (with 16, fp32 parameters spill 8 bytes at 128 registers).
    * The B update runs 8 warps with ``maxnreg`` stated, 2 stages at padded rank 16 and 1 at
      64, for both ways of computing P' (:func:`p_split`). With U products at any
      precision, bf16 U and a gradient scale, every other choice tried spills for some
      variant: at rank 16, 4 warps with 2 or 3 stages, with or without ``maxnreg``, 8-32
      bytes on sm_90; at rank 64, 16 warps (128 registers a thread) with 1-3 stages or 8
      warps with 2 stages, 8-40 bytes on sm_80 or sm_90 (Triton 3.9; 3.6 alike). A bucket
      that splits m runs its U products at ``"ieee"`` (:func:`.launch._prepare`): at padded
      rank 64 its tf32x3 variant spills 8 bytes on sm_80 with Triton 3.6.
    """
    if factor_a:
        cols, warps, stages = {16: (64, 8, 3), 64: (16, 16, 2)}[block_r]
        cfg = dict(BLOCK_ROWS=16, BLOCK_K=16, BLOCK_COLS=cols, num_warps=warps)
    else:
        if update:
            rows, warps, stages = {16: (32, 8, 2), 64: (16, 8, 1)}[block_r]
        else:
            rows, warps, stages = {16: (32, 4, 3), 64: (16, 8, 3)}[block_r]
        cfg = dict(BLOCK_ROWS=rows, BLOCK_K=16, BLOCK_COLS=16, num_warps=warps)
    cfg["num_stages"] = stages if update else 3
    if not update or not factor_a:  # maxnreg stated: the stats pass and the B update
        cfg["maxnreg"] = min(255, 65536 // (32 * cfg["num_warps"]))
    # Stated explicitly: Triton 3.10 changes the default to no mul-add fusion.
    cfg["enable_fp_fusion"] = True
    return cfg


def ptile_config(block_r: int, precision: str) -> dict:
    """Launch configuration of :func:`.kernels._p_tile_kernel` (``P' = Uᵀ B'`` tiles) for a
    padded rank ``block_r`` and the U products' ``precision``: a (BLOCK_KP, r) tile of P'
    per program, U swept ``BLOCK_M`` rows at a time. On the tensor cores (any precision but
    ``"ieee"``) the tile is 64 rows of P' over chunks of 32 rows of U; with ``"ieee"`` (FMA
    units, operands in registers) 32 × 16."""
    if precision == "ieee":
        cfg = dict(BLOCK_KP=32, BLOCK_M=16, num_warps=4 if block_r == 16 else 8, num_stages=3)
    else:
        cfg = dict(BLOCK_KP=64, BLOCK_M=32, num_warps=4, num_stages=3)
    cfg["enable_fp_fusion"] = True
    return cfg


def terms_config(block_r: int) -> dict:
    """Launch configuration of :func:`.kernels._terms_kernel` (one program per pair)."""
    return dict(BLOCK_K=16, num_warps=4 if block_r == 16 else 8, num_stages=2, enable_fp_fusion=True)


def p_split(shapes: Sequence[tuple[int, int, int, int]]) -> bool:
    """Whether a bucket computes ``P' = Uᵀ B'`` as split-m partials summed by the reduction
    (True) or by :func:`.kernels._p_tile_kernel`'s tiles (False).

    The rule: split-m partials only while every pair has ``m ≥ 32 · max(k, r)``. The
    partials of a strip are ``k × r`` values for ``BLOCK_ROWS × blocks`` rows of U read, so
    they stay a small fraction of U's bytes only while k is small against m; past that the
    tiles, which write P' once and read U once more, move fewer bytes. (The constant 32 is
    the issue's starting point; the GPU benchmark of docs/triton.md is what confirms or
    moves it.)
    """
    return all(m >= 32 * max(k, r) for m, _, r, k in shapes)


#: Launch options among the keys of :func:`kernel_config` (the rest are constexprs).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion")


def padded_rank(r: int) -> int:
    """Rank padded to the kernels' block: 16 (``tl.dot``'s minimum) for r ≤ 16, else 64.
    (A 32 block spills registers for B at every tile size tried; see docs/triton.md.)"""
    return 16 if r <= 16 else 64


# Bytes of U one B strip may cover: phase 2 re-reads them, and they must still be in
# cache (L1/L2) by then.
U_STRIP_BYTES = 128 * 1024


def _programs_target(device: torch.device) -> int:
    """Programs per launch worth aiming for: a few per SM (few under the interpreter, so
    that the tests exercise strips of several blocks)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def strip_blocks(total_blocks: int, target_programs: int, block_bytes: int = 0, partial_bytes: int = 0) -> int:
    """Blocks per strip.

    Long strips mean fewer partial statistics to write and sum, but at least
    ``target_programs`` programs should remain. For B (``block_bytes``: bytes of U in one
    block, ``partial_bytes``: bytes of one strip's partial P and G), a strip whose U fits
    :data:`U_STRIP_BYTES` is re-read from cache in phase 2; a longer one is re-read from
    DRAM, which is chosen only when that costs less than the extra partials.
    """
    blocks = max(1, total_blocks // max(1, target_programs))
    if block_bytes:
        fit = max(1, U_STRIP_BYTES // block_bytes)
        if fit < blocks:
            # DRAM bytes per block: partials written + read, plus U again if it overflows cache
            cost_fit = 2 * partial_bytes / fit + (block_bytes if block_bytes > U_STRIP_BYTES else 0)
            cost_long = 2 * partial_bytes / blocks + block_bytes
            if cost_fit <= cost_long:
                blocks = fit
    return blocks


@lru_cache(maxsize=256)
def _layout(shapes: tuple, block_r: int, u_bytes: int, device: torch.device, split: bool = True):
    """Strip tables and scratch offsets for a bucket of pairs with ``shapes`` ((m, n, r, k), …).

    Returns ``(b_tiles, a_tiles, p_spans, m_spans, scratch_numel)``: device int64 strip
    tables (rows ``(pair, first row/column, blocks, scratch offset)``), per pair
    ``(offset, strip_stride, n_strips)`` of its B and A partials, and the scratch size
    (fp32 elements). A B strip's partials are ``P_s`` (k, r, only with ``split``: see
    :func:`p_split`) then ``G_s`` (r, r). Cached: it depends only on the shapes.
    """
    cfg_b, cfg_a = kernel_config(block_r, False), kernel_config(block_r, True)
    rows_b, cols_a = cfg_b["BLOCK_ROWS"], cfg_a["BLOCK_COLS"]
    target = _programs_target(device)
    max_k = max(k for _, _, _, k in shapes)
    max_r = max(r for _, _, r, _ in shapes)
    per_b = strip_blocks(sum(triton.cdiv(m, rows_b) for m, _, _, _ in shapes), target,
                         rows_b * max_k * u_bytes if split else 0, 4 * (max_k * max_r * split + max_r * max_r))
    per_a = strip_blocks(sum(triton.cdiv(n, cols_a) for _, n, _, _ in shapes), target)

    def strips(sizes_strides, per_block, per_strip, offset):
        """Strip rows ``(pair, first row/column, blocks, scratch offset)`` of one factor and
        its per-pair partial spans ``(offset, stride, n_strips)``, placed from ``offset``."""
        rows, spans = [], []
        for j, (size, stride) in enumerate(sizes_strides):
            blocks = triton.cdiv(size, per_block)
            n = triton.cdiv(blocks, per_strip)
            spans.append((offset, stride, n))
            for t in range(n):
                rows.append((j, t * per_strip * per_block, min(per_strip, blocks - t * per_strip), offset + t * stride))
            offset += n * stride
        return rows, tuple(spans), offset

    b_rows, p_spans, offset = strips([(m, k * r * split + r * r) for m, _, r, k in shapes], rows_b, per_b, 0)
    a_rows, m_spans, offset = strips([(n, r * r) for _, n, r, _ in shapes], cols_a, per_a, offset)
    b_tiles = torch.tensor(b_rows, dtype=torch.int64).reshape(-1, int(TILE_FIELDS)).to(device)
    a_tiles = torch.tensor(a_rows, dtype=torch.int64).reshape(-1, int(TILE_FIELDS)).to(device)
    return b_tiles, a_tiles, p_spans, m_spans, offset


def predicted_step_bytes(
    shapes: Sequence[tuple[int, int, int, int]], param_bytes: int, u_bytes: int, sm_count: int
) -> dict[str, float]:
    """DRAM bytes of one fused step under this backend's layout, and the floor.

    Args:
        shapes: ``(m, n, r, k)`` per pair. param_bytes: 4 (fp32), 2 (bf16/fp16).
        u_bytes: bytes per element of U. sm_count: streaming multiprocessors of the GPU.

    Returns:
        ``floor``: plain AdamW bytes on A and B (read param, grad, two moments; write param,
        two moments) + one read of U + the statistics; ``fused``: the same plus the partial
        statistics written and read back and the small ``Q_B``/``R_B``/``H`` reads, with U
        read once where the strip's U fits :data:`U_STRIP_BYTES` (phase 2 hits cache) and
        twice where the layout chose longer strips; ``fused_u_twice``: every U read twice
        (phase 2 missing cache everywhere); ``partials``: bytes of partial statistics written.
    """
    shapes = [tuple(int(v) for v in s) for s in shapes]
    floor = fused = partials = u_total = 0.0
    buckets: dict[int, list] = {}
    for shape in shapes:
        buckets.setdefault(padded_rank(shape[2]), []).append(shape)
    for block_r, group in buckets.items():
        rows_b = kernel_config(block_r, False)["BLOCK_ROWS"]
        cols_a = kernel_config(block_r, True)["BLOCK_COLS"]
        max_k = max(k for _, _, _, k in group)
        max_r = max(r for _, _, r, _ in group)
        block_bytes = rows_b * max_k * u_bytes
        per_b = strip_blocks(sum(-(-m // rows_b) for m, _, _, _ in group), 4 * sm_count, block_bytes,
                             4 * (max_k * max_r + max_r * max_r))
        u_again = per_b * block_bytes > U_STRIP_BYTES
        per_a = strip_blocks(sum(-(-n // cols_a) for _, n, _, _ in group), 4 * sm_count)
        for m, n, r, k in group:
            adamw = (3 * param_bytes + 16) * (m * r + r * n)
            stats = 4 * (k * r + 2 * r * r)
            u_read = u_bytes * m * k
            part = 4 * (-(-m // (rows_b * per_b)) * (k * r + r * r) + -(-n // (cols_a * per_a)) * r * r)
            floor += adamw + u_read + stats
            fused += adamw + u_read * (2 if u_again else 1) + stats + 2 * part + 4 * (2 * r * r + k * r)
            partials += part
            u_total += 0 if u_again else u_read
    return {"floor": floor, "fused": fused, "fused_u_twice": fused + u_total, "partials": partials}

