"""AsFTAdamW under torch.distributed: user-facing helpers and the bytes each step communicates.

DDP needs nothing: every rank runs the anchored step on identical full tensors. Under FSDP2
the step itself (statistics on local shards, one all-reduce of the small sums, A gathered
when its rows are split) lives in the core, :mod:`asft_kernels.sharding`; its names are
re-exported here. This module adds what users call:

* :func:`lora_A_column_sharding`: a ``shard_placement_fn`` sharding every ``lora_A`` on
  columns, so that a step all-reduces k·r + 2r² numbers per pair and gathers nothing;
* :func:`measure_step_communication` and ``asft comm-report``: the collectives of a step,
  recorded through :func:`record_collectives` (per step and pair O(k·r + r² + r·n)
  numbers, O(k·r + r²) with column-sharded A; nothing of size m × n, m × m or m × r).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from ..sharding import (  # noqa: F401  (re-exported: the user-facing names live here too)
    _ACTIVE_LOGS,
    CollectiveRecord,
    CommunicationLog,
    ShardedPair,
    all_gather_rows,
    all_reduce_sum,
    complete_sharded_step,
    local_tensor,
    record_collectives,
    sharded_pair,
)


def lora_A_column_sharding(model, adapter_name: str = "default"):
    """A ``shard_placement_fn`` for ``fully_shard`` that shards every ``lora_A`` weight (r, n)
    on dim 1 (columns) and leaves every other parameter to FSDP2's default (dim 0).

    With A split on columns, ``M = A Aᵀ`` is a sum over columns and ``H A`` is column-local,
    so the anchored step all-reduces k·r + 2r² numbers per pair and gathers nothing.

    Example::

        place = lora_A_column_sharding(peft_model)
        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer, shard_placement_fn=place)
        fully_shard(peft_model, shard_placement_fn=place)
    """
    from torch import nn
    from torch.distributed.tensor import Shard

    ids = {
        id(mod.lora_A[adapter_name].weight)
        for mod in model.modules()
        if isinstance(getattr(mod, "lora_A", None), nn.ModuleDict) and adapter_name in mod.lora_A
    }

    def placement(param):
        return Shard(1) if id(param) in ids else None

    return placement


# ---------------------------------------------------------------------- report
def measure_step_communication(
    m: int, n: int, r: int, k: int, pairs: int, steps: int = 2, dtype: torch.dtype = torch.float32,
    a_columns: bool = False,
) -> list[CommunicationLog]:
    """Run ``steps`` anchored steps on ``pairs`` LoRA pairs of shape B (m, r), A (r, n) with a
    k-direction anchor, sharded by ``fully_shard`` over all ranks of the default process
    group (A on rows, or on columns with ``a_columns``), and return this rank's
    :class:`CommunicationLog` of each step.

    The base weights live on the meta device (only their shape matters to the anchor), so
    Llama-2-7B shapes fit on a laptop. Call on every rank of an initialized process group.
    """
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from ..anchor import AlignmentAnchor, AnchorEntry
    from ..optim import AsFTAdamW

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0].float()
    s = torch.linspace(2.0, 1.0, k)
    entry = AnchorEntry(U=U, s=s, fro_norm=float(s.norm()) * 1.01, shape=(m, n), energy=0.98)

    class _Lora(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(n, m, bias=False, device="meta")
            self.lora_A = nn.ModuleDict({"default": nn.Linear(n, r, bias=False, device=device, dtype=dtype)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(r, m, bias=False, device=device, dtype=dtype)})

    model = nn.ModuleDict({f"layer{i}": _Lora() for i in range(pairs)})
    place = lora_A_column_sharding(model) if a_columns else None
    for mod in model.values():
        fully_shard([mod.lora_A["default"], mod.lora_B["default"]], mesh=mesh, shard_placement_fn=place)
    anchor = AlignmentAnchor({f"layer{i}": entry for i in range(pairs)})
    binding = anchor.bind(model)
    params = [p for mod in model.values() for p in (mod.lora_A["default"].weight, mod.lora_B["default"].weight)]
    opt = AsFTAdamW(params, lr=1e-3, anchor=binding)
    logs = []
    for _ in range(steps):
        for p in params:  # random gradients, drawn per shard
            p.grad = DTensor.from_local(torch.randn_like(p.to_local()), p.device_mesh, p.placements,
                                        run_check=False, shape=p.shape, stride=p.stride())
        with record_collectives() as log:
            opt.step()
        logs.append(log)
    return logs


def _report_worker(rank: int, world: int, rdzv: str, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        for a_columns in (False, True):
            for r in args.r:
                for k in args.k:
                    first, steady = measure_step_communication(args.m, args.n, r, k, args.pairs, steps=2,
                                                               a_columns=a_columns)
                    if rank == 0:
                        out[(a_columns, r, k)] = (first.count(), first.sent_bytes, first.received_bytes,
                                                  steady.count(), steady.sent_bytes, steady.received_bytes,
                                                  steady.largest_message_bytes)
    finally:
        dist.destroy_process_group()


def spawn_bounded(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` that gives up after ``timeout_s``
    seconds: the workers still running are killed and :class:`TimeoutError` is raised (a
    collective that never completes would otherwise wait forever). A worker's exception is
    raised as ``spawn`` raises it."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
            for proc in context.processes:
                proc.join(10)
            raise TimeoutError(f"the {nprocs} spawned workers did not finish within {timeout_s:g} s (killed)")


def _comm_report(args: argparse.Namespace) -> int:
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        out = manager.dict()
        try:
            spawn_bounded(_report_worker, (args.world_size, f"{tmp}/rdzv", args, out), args.world_size, args.timeout)
        except TimeoutError as exc:
            print(f"asft comm-report: {exc}; nothing measured (raise --timeout for larger shapes)", file=sys.stderr)
            return 1
        rows = dict(out)
    print(f"# FSDP2 anchored step, world size {args.world_size}, {args.pairs} pairs of B ({args.m}, r), "
          f"A (r, {args.n}), fp32 params; bytes per rank, counted in the collectives")
    print(f"# one m x n fp32 matrix: {args.m * args.n * 4:,} bytes")
    print("| lora_A sharded on | r | k | 1st step: collectives | 1st step: sent / received | per step: collectives "
          "| per step: sent | per step: received | per step and pair: sent + received | largest message |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (a_columns, r, k), (c1, s1, r1, c, sent, recv, big) in sorted(rows.items()):
        print(f"| {'dim 1' if a_columns else 'dim 0'} | {r} | {k} | {c1} | {s1:,} / {r1:,} | {c} | {sent:,} | "
              f"{recv:,} | {(sent + recv) / args.pairs:,.0f} | {big:,} |")
    return 0


def register_cli(subparsers) -> None:
    """``asft comm-report``: measure the bytes the anchored FSDP2 step communicates."""
    p = subparsers.add_parser(
        "comm-report", help="measure the collectives of the anchored step under FSDP2 (CPU, gloo)",
        description="Spawn WORLD_SIZE CPU processes (gloo), shard PAIRS LoRA pairs with fully_shard, run "
                    "two anchored steps and print the bytes each rank sends and receives per step.",
    )
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--m", type=int, default=4096, help="rows of B (out features)")
    p.add_argument("--n", type=int, default=4096, help="columns of A (in features)")
    p.add_argument("--pairs", type=int, default=64, help="anchored LoRA pairs (Llama-2-7B q/v: 64)")
    p.add_argument("--r", type=int, nargs="+", default=[8, 64], help="LoRA ranks")
    p.add_argument("--k", type=int, nargs="+", default=[64, 256], help="anchor ranks")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds after which the workers are killed and nothing is reported (default 3600)")
    p.set_defaults(func=_comm_report)
