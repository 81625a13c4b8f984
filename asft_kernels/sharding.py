"""Sharded parameters in the anchored step: FSDP2 local shards, and the local no-op case.

**DDP** replicates every parameter and all-reduces the gradients before ``step()``, so
each rank runs the anchored step on identical full tensors: every pair is local and
nothing here does any work for it (:func:`sharded_pair` returns None).

**FSDP2** (``torch.distributed.fsdp.fully_shard``) hands the optimizer DTensor
parameters, by default sharded on dim 0: rank ``q`` holds rows ``b_q`` of ``B`` (m, r) and
rows ``a_q`` of ``A`` (r, n) (``torch.chunk`` layout). Symbols as in docs/method.md:

* ``P = Uᵀ B = Σ_q U[b_q]ᵀ B[b_q]`` (k, r) and ``G = Bᵀ B = Σ_q B[b_q]ᵀ B[b_q]`` (r, r)
  are sums over B's rows: each rank's backend computes its partial sums from its rows of B
  and the matching rows of U, then one all-reduce of the k·r + r² numbers per pair. The B
  update is row-local (``Q_B``, ``R_B`` are global r × r / k × r matrices).
* ``M = A Aᵀ`` (r, r) and the anchoring gradient of A, ``(H A)[a_q] = H[a_q, :] A``,
  need every row of A: A (r × n, tiny) is all-gathered once per step, right after the
  update; the gathered copy gives this step's ``M`` and is the next step's A. The backend
  updates a full-size (r, n) copy of A whose other ranks' rows carry zero gradient and
  moments; only this rank's rows are copied back into the shards.
* With ``lora_A`` sharded on dim 1 instead (see
  :func:`asft_kernels.integrations.distributed.lora_A_column_sharding`), ``M`` is a sum
  over columns and ``H A`` is column-local: nothing is gathered, one all-reduce of
  k·r + 2r² per pair.

The statistics carried to the next step are the all-reduced ones, so every rank holds
the same ``P, G, M`` and computes the same anchoring terms. All collectives go through
:func:`all_reduce_sum` and :func:`all_gather_rows`, which report to every active
:func:`record_collectives` log.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import OptimizerInputError


def _dtensor_class():
    """``DTensor`` if torch.distributed.tensor has been imported, else None. Importing it
    is slow, and no tensor can be a DTensor before it is imported, so plain
    single-process use never pays for it."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


# ---------------------------------------------------------------------- accounting
@dataclass(frozen=True)
class CollectiveRecord:
    """One collective issued by this module on this rank.

    Attributes:
        op: ``"all_reduce"`` or ``"all_gather"``.
        sent_bytes: bytes this rank contributes (its input tensor).
        received_bytes: bytes of the collective's result on this rank.
        group_size: ranks taking part.
        dtype: element dtype.
    """

    op: str
    sent_bytes: int
    received_bytes: int
    group_size: int
    dtype: torch.dtype


@dataclass
class CommunicationLog:
    """The collectives issued while a :func:`record_collectives` block was active."""

    records: list[CollectiveRecord] = field(default_factory=list)

    @property
    def sent_bytes(self) -> int:
        """Total bytes contributed by this rank."""
        return sum(r.sent_bytes for r in self.records)

    @property
    def received_bytes(self) -> int:
        """Total bytes of the collectives' results on this rank."""
        return sum(r.received_bytes for r in self.records)

    @property
    def largest_message_bytes(self) -> int:
        """The largest single input or result, in bytes (0 when nothing was sent)."""
        return max((max(r.sent_bytes, r.received_bytes) for r in self.records), default=0)

    def count(self, op: str | None = None) -> int:
        """Number of collectives (of kind ``op`` if given)."""
        return sum(1 for r in self.records if op is None or r.op == op)


_ACTIVE_LOGS: list[CommunicationLog] = []
# all_gather_single replaces all_gather_into_tensor in recent torch releases
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@contextlib.contextmanager
def record_collectives() -> Iterator[CommunicationLog]:
    """Log every collective the anchored step issues inside the block (on this rank).

    Example::

        with record_collectives() as log:
            optimizer.step()
        print(log.count(), log.sent_bytes, log.received_bytes)
    """
    log = CommunicationLog()
    _ACTIVE_LOGS.append(log)
    try:
        yield log
    finally:
        _ACTIVE_LOGS.remove(log)


def _record(op: str, sent: Tensor, received: Tensor, group) -> None:
    if not _ACTIVE_LOGS:
        return
    rec = CollectiveRecord(op, sent.numel() * sent.element_size(), received.numel() * received.element_size(),
                           dist.get_world_size(group), sent.dtype)
    for log in _ACTIVE_LOGS:
        log.records.append(rec)


def all_reduce_sum(tensor: Tensor, group) -> None:
    """Sum a contiguous 1-D ``tensor`` over ``group`` in place (recorded)."""
    _record("all_reduce", tensor, tensor, group)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def all_gather_rows(local: Tensor, row_ranges: Sequence[tuple[int, int]], group) -> Tensor:
    """Concatenate the row blocks that the ranks of ``group`` hold (recorded).

    Args:
        local: (rows_q, ...) this rank's block; ranks may hold different row counts
            (``torch.chunk`` layout), so blocks are padded to the largest for the collective.
        row_ranges: ``[start, stop)`` of each group rank's block, in group-rank order.
        group: the process group.

    Returns:
        (Σ rows_q, ...) every block in rank order.
    """
    width = max(stop - start for start, stop in row_ranges)
    tail = tuple(local.shape[1:])
    padded = local.new_zeros((width, *tail))
    padded[: local.shape[0]].copy_(local)
    out = local.new_empty((len(row_ranges) * width, *tail))
    _record("all_gather", padded, out, group)
    _all_gather_single(out, padded, group=group)
    blocks = [out[q * width : q * width + (stop - start)] for q, (start, stop) in enumerate(row_ranges)]
    return torch.cat(blocks, 0)


# ---------------------------------------------------------------------- sharded pairs
def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (where its storage and version counter live), else ``t``."""
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(t, dtensor):
        return t._local_tensor
    return t


def _chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    # torch.chunk layout, as DTensor's Shard(d) and FSDP2 use it
    chunk = math.ceil(size / parts) if size else 0
    start = min(index * chunk, size)
    return start, min(start + chunk, size)


@dataclass
class _Sharding:
    """How a DTensor is split: along ``dim`` over ``group`` (both None when replicated),
    ``ranges`` of that dim per group rank, ``local`` the range this rank holds."""

    dim: int | None
    group: object
    ranges: list[tuple[int, int]]
    local: tuple[int, int]


def _sharding(t: Tensor, name: str, label: str, dims: tuple[int, ...]) -> _Sharding:
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = t.device_mesh, t.placements
    shard_dims = [d for d, p in enumerate(placements) if not isinstance(p, Replicate)]
    allowed = " or ".join(f"Shard({d})" for d in dims)
    for d in shard_dims:
        p = placements[d]
        if type(p) is not Shard or p.dim not in dims:
            raise OptimizerInputError(
                f"{name}: {label} is a DTensor with placements {placements}; anchoring supports {label} "
                f"placements {allowed} (FSDP2) and Replicate only"
            )
    if len(shard_dims) > 1:
        raise OptimizerInputError(
            f"{name}: {label} is sharded over {len(shard_dims)} mesh dimensions ({placements}); anchoring "
            "supports one sharded mesh dimension (FSDP2 or HSDP)"
        )
    if not shard_dims:
        return _Sharding(None, None, [(0, t.shape[0])], (0, t.shape[0]))
    d = shard_dims[0]
    dim = placements[d].dim
    size, parts = t.shape[dim], mesh.size(d)
    ranges = [_chunk_range(size, parts, q) for q in range(parts)]
    local = ranges[mesh.get_local_rank(d)]
    if t._local_tensor.shape[dim] != local[1] - local[0]:
        raise OptimizerInputError(
            f"{name}: {label} holds {tuple(t._local_tensor.shape)} locally, expected indices {local} of {size} "
            f"along dim {dim} (torch.chunk layout)"
        )
    return _Sharding(dim, mesh.get_group(d), ranges, local)


@dataclass
class ShardedPair:
    """The local view of an anchored pair whose parameters are DTensors (FSDP2).

    Attributes:
        name: module name (for messages).
        A, B: the DTensor parameters, global shapes (r, n) and (m, r).
        rows_B: ``[start, stop)`` of the rows of B (and of U) held by this rank.
        dim_A: 0 when A is sharded on rows (FSDP2's default), 1 on columns, None replicated.
        ranges_A: per group rank, the ``[start, stop)`` of A along ``dim_A``.
        local_A: this rank's entry of ``ranges_A``.
        group: the process group over which the pair is sharded (None: replicated).
    """

    name: str
    A: Tensor
    B: Tensor
    rows_B: tuple[int, int]
    dim_A: int | None
    ranges_A: list[tuple[int, int]]
    local_A: tuple[int, int]
    group: object
    # (full-size A, exp_avg_A, exp_avg_sq_A) handed to the backend this step, each with the
    # local shard its rows ``local_A`` are copied back into
    _staged_A: tuple | None = field(default=None, repr=False)

    @property
    def splits_A_rows(self) -> bool:
        """True when A's rows are split over ranks (the same answer on every rank, so all
        ranks take part in the same collectives)."""
        return self.dim_A == 0 and any(rows != (0, self.A.shape[0]) for rows in self.ranges_A)

    def U_rows(self, U: Tensor) -> Tensor:
        """Rows ``rows_B`` of the basis ``U`` (m, k): those matching this rank's rows of B."""
        start, stop = self.rows_B
        return U[start:stop]

    # -------------------------------------------------------------- statistics
    def statistics(self, stats_pass, U: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Fresh global ``(P, G, M)`` from the stored shards: the backend's stats pass on this
        rank's rows of B and U, and on its columns of A, or on all of A (one all-gather) when
        A is split on rows; then one all-reduce of the partial sums.

        Args:
            stats_pass: a backend's ``stats_pass(U, B, A)``.
            U: (m, k) full basis; this rank uses rows ``rows_B``.

        Returns:
            ``P`` (k, r), ``G`` (r, r), ``M`` (r, r) in the math dtype, and all of ``A``
            (r, n) in the parameter dtype when A is split on rows (else None).
        """
        (A_used,) = _gather_A([self])
        (P,), (G,), (M,) = stats_pass([self.U_rows(U)], [local_tensor(self.B).detach()], [A_used])
        _all_reduce_stats([self], P=[P], G=[G], M=[M])
        return P, G, M, (A_used if self.splits_A_rows else None)

    # -------------------------------------------------------------- fused step
    def localize(self, item: dict, A_full: Tensor | None) -> dict:
        """Map one pair's fused-step arguments (global tensors, optimizer state DTensors) to
        what this rank hands the backend, within the contract's shapes.

        B side: this rank's rows of B, its gradient and moments, with the matching rows of U.
        A side, sharded on columns: this rank's columns (``H A`` is column-local).
        A side, split on rows: full-size (r, n) copies: all of A as stored before the step,
        the local gradient and moments in this rank's rows and zeros elsewhere, so
        ``g_A = grad_A + H A`` is exact on the local rows; only those rows are copied back
        (:func:`complete_sharded_step`). The backend writes local partial sums into ``P``,
        ``G`` (and ``M`` for column shards); with rows split, ``M`` is rebuilt from the
        gathered A.

        Args:
            item: the fused-step arguments by schema name (``A``, ``B``, ``exp_avg_A``, …).
            A_full: (r, n) all of A as stored before this step (parameter dtype), needed
                when A is split on rows.
        """
        out = dict(item)
        for key in ("A", "B", "exp_avg_A", "exp_avg_sq_A", "exp_avg_B", "exp_avg_sq_B", "grad_A", "grad_B"):
            out[key] = local_tensor(item[key])
        out["U"] = self.U_rows(item["U"])
        if self.splits_A_rows:
            start, stop = self.local_A
            staged = []
            for key in ("A", "grad_A", "exp_avg_A", "exp_avg_sq_A"):
                local = out[key]
                full = A_full.clone() if key == "A" else local.new_zeros(A_full.shape)
                full[start:stop].copy_(local)
                staged.append((full, local))
                out[key] = full
            self._staged_A = (staged[0], staged[2], staged[3])
        return out

    def write_back(self) -> None:
        """Copy this rank's rows of the updated full-size A and moments into the shards."""
        if self._staged_A is None:
            return
        start, stop = self.local_A
        for full, local in self._staged_A:
            local.copy_(full[start:stop])
        self._staged_A = None


def sharded_pair(name: str, A: Tensor, B: Tensor) -> ShardedPair | None:
    """The :class:`ShardedPair` of ``A`` (r, n) and ``B`` (m, r) if they are DTensors, None
    for plain tensors (single process, DDP).

    Supported placements (one sharded mesh dimension, any number of replicated ones): B on
    ``Shard(0)``; A on ``Shard(0)`` (FSDP2's default) or ``Shard(1)`` (see
    :func:`lora_A_column_sharding`), over the same mesh dimension as B.

    Raises:
        OptimizerInputError: only one of the two is a DTensor, they live on different meshes
            or mesh dimensions, or another placement is used (e.g. tensor parallelism).
    """
    dtensor = _dtensor_class()
    if dtensor is None:
        return None
    a_dt, b_dt = isinstance(A, dtensor), isinstance(B, dtensor)
    if not a_dt and not b_dt:
        return None
    if a_dt != b_dt:
        raise OptimizerInputError(
            f"{name}: lora_A is {'a DTensor' if a_dt else 'a plain tensor'} but lora_B is "
            f"{'a DTensor' if b_dt else 'a plain tensor'}; shard both with the same fully_shard call"
        )
    if A.device_mesh != B.device_mesh:
        raise OptimizerInputError(f"{name}: lora_A and lora_B are sharded over different device meshes")
    sa = _sharding(A, name, "lora_A", (0, 1))
    sb = _sharding(B, name, "lora_B", (0,))
    if (sa.group is None) != (sb.group is None):
        raise OptimizerInputError(f"{name}: lora_A and lora_B must both be sharded or both replicated")
    if sb.group is not None and sa.group is not sb.group:
        raise OptimizerInputError(f"{name}: lora_A and lora_B are sharded over different mesh dimensions")
    return ShardedPair(name, A, B, sb.local, sa.dim, sa.ranges, sa.local, sb.group)


def _all_reduce_stats(
    pairs: Sequence[ShardedPair], P: Sequence[Tensor], G: Sequence[Tensor], M: Sequence[Tensor]
) -> None:
    """Sum the partial ``P`` (k, r), ``G`` (r, r) (and ``M`` (r, r) of pairs whose A is
    sharded on columns) over each pair's group, in place: one all-reduce per (group, dtype,
    device) for all pairs."""
    batches: dict[tuple, list[tuple[Tensor, ...]]] = {}
    for i, pair in enumerate(pairs):
        if pair.group is not None:
            parts = (P[i], G[i], M[i]) if pair.dim_A == 1 else (P[i], G[i])
            batches.setdefault((id(pair.group), P[i].dtype, P[i].device), []).append((pair.group, parts))
    for entries in batches.values():
        tensors = [t for _, parts in entries for t in parts]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        all_reduce_sum(flat, entries[0][0])
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _gather_A(pairs: Sequence[ShardedPair]) -> list[Tensor]:
    """Each pair's A as the backend needs it, parameter dtype: all of A (r, n) for pairs
    whose A is split on rows (one all-gather per group, dtype, device and row layout, the
    pairs' blocks side by side), the local shard otherwise."""
    gathered: list[Tensor] = [local_tensor(pair.A).detach() for pair in pairs]
    batches: dict[tuple, list[int]] = {}
    for i, pair in enumerate(pairs):
        if pair.splits_A_rows:
            a = gathered[i]
            batches.setdefault((id(pair.group), a.dtype, a.device, tuple(pair.ranges_A)), []).append(i)
    for idx in batches.values():
        group, ranges = pairs[idx[0]].group, pairs[idx[0]].ranges_A
        full = all_gather_rows(torch.cat([gathered[i] for i in idx], 1), ranges, group)
        offset = 0
        for i in idx:
            n = pairs[i].A.shape[1]
            gathered[i] = full[:, offset : offset + n].contiguous()
            offset += n
    return gathered


def complete_sharded_step(
    pairs: Sequence[ShardedPair], P: Sequence[Tensor], G: Sequence[Tensor], M: Sequence[Tensor]
) -> list[Tensor | None]:
    """Finish the fused step of sharded pairs: copy the local rows of A and its moments
    back into the shards, all-reduce the partial ``P`` (k, r), ``G`` (r, r) (and ``M`` for
    column-sharded A) in place, and for row-split A gather the updated A (r, n) and write
    ``M = A Aᵀ`` (r, r) in place.

    Pairs are batched per process group and dtype: one all-reduce (and one all-gather for
    row-split A) per batch, whatever the number of layers.

    Returns:
        Per pair, all of A after the step, (r, n) in the parameter dtype, when A is split on
        rows (the next step's input of :meth:`ShardedPair.localize`), else None.
    """
    for pair in pairs:
        pair.write_back()
    _all_reduce_stats(pairs, P, G, M)
    gathered = _gather_A(pairs)
    out: list[Tensor | None] = []
    for pair, a_full, m in zip(pairs, gathered, M):
        if pair.splits_A_rows:  # otherwise the backend's M is complete, or was all-reduced
            a = a_full.to(m.dtype)
            m.copy_(a @ a.T)
        out.append(a_full if pair.splits_A_rows else None)
    return out
