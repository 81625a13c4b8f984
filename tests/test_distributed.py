"""AsFTAdamW under DDP and FSDP2: two CPU processes (gloo) against one process.

One spawn of two workers runs every scenario (DDP, FSDP2, FSDP2 with a distributed
checkpoint in the middle, bad placements) for every backend that runs here, and writes
what rank 0 saw; the tests compare it with single-process trajectories computed here.

The workers free every DDP model before destroying the process group and leave without
interpreter teardown: a DDP reducer destroyed after the group (it holds the GIL and waits in
the gloo group's destructor for a worker thread that waits for the GIL) can deadlock at
exit. The spawn is bounded by ``SPAWN_TIMEOUT_S``, so a hang fails the tests instead of
stalling the run.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
from conftest import available_backends, lora, tiny_llama

import asft_kernels as asft
from asft_kernels.errors import OptimizerInputError
from asft_kernels.integrations.distributed import lora_A_column_sharding, record_collectives
from asft_kernels.reference import paper_regularizer

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

WORLD = 2
STEPS = 5
RESUME_AT = 2  # FSDP2 checkpoint is written after this many steps
R = 3  # odd: A (3, n) splits 2 + 1 rows over two ranks
K = 5
LAMBDA = 0.5
LR = 1e-2
SAMPLES, SEQ, VOCAB = 4, 8, 64
TARGETS = ("q_proj", "v_proj")
SPAWN_TIMEOUT_S = 600  # the whole two-worker spawn; about a minute on two loaded cores
# float32 parameters: distributed vs single process, and vs the float64 published formula
TOL = 1e-5
TOL_BF16 = 3e-2
# backends that run CPU tensors; FSDP2 runs with each, DDP and the checkpoint with the last
BACKENDS = [b for b in available_backends() if b in ("eager", "cpp")]
DEFAULT = BACKENDS[-1]


def _base_model(dtype=torch.float32):
    return tiny_llama(dtype, vocab=VOCAB)


def _peft_model(dtype=torch.float32, lora_dtype=None):
    """Tiny Llama with LoRA; PEFT keeps adapters fp32 unless ``lora_dtype`` asks for the
    model's own (low-precision) dtype."""
    if lora_dtype is None:
        return lora(_base_model(dtype), r=R, targets=TARGETS)
    from peft import LoraConfig, get_peft_model

    base = _base_model(dtype)
    torch.manual_seed(1)
    cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=list(TARGETS), init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(base, cfg, autocast_adapter_dtype=False)


def _anchor():
    base = _base_model(torch.float64)
    g = torch.Generator().manual_seed(7)
    deltas = {name: torch.randn(mod.weight.shape, generator=g, dtype=torch.float64)
              for name, mod in base.named_modules() if name.endswith(TARGETS)}
    return asft.AlignmentAnchor.from_deltas(deltas, rank=K)


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)


def _lora_params(model) -> dict[str, torch.Tensor]:
    """LoRA weights by normalized module name, full tensors (DTensors gathered)."""
    from asft_kernels.anchor import normalize_module_name

    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[normalize_module_name(name)] = full.detach().clone()
    return out


def _optimizer(model, binding, backend):
    params = [p for p in model.parameters() if p.requires_grad]
    return asft.AsFTAdamW(params, lr=LR, weight_decay=0.01, anchor=binding, anchor_lambda=LAMBDA, backend=backend)


def _train(model, opt, steps, rows=slice(None), log_last=False):
    """Steps ``steps`` on rows ``rows`` of each batch; returns anchor losses and the last step's log."""
    losses, log = [], None
    for s in steps:
        ids = _batch(s)[rows]
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if log_last and s == steps[-1]:
            with record_collectives() as log:
                opt.step()
        else:
            opt.step()
        losses.append(float(opt.anchor_loss))
    return losses, log


# ---------------------------------------------------------------------- workers
def _fsdp2(mesh, backend, a_columns=False, dtype=torch.float32):
    from torch.distributed.fsdp import fully_shard

    model = _peft_model(dtype, lora_dtype=None if dtype == torch.float32 else dtype)
    place = lora_A_column_sharding(model) if a_columns else None
    # bind works before and after fully_shard: the row-sharded runs bind first
    binding = None if a_columns else _anchor().bind(model)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, shard_placement_fn=place)
    if binding is None:
        binding = _anchor().bind(model)
    return model, binding, _optimizer(model, binding, backend)


def _scenarios(rank: int, out_dir: str, backends: list[str]) -> dict:
    """Every scenario on this rank; what it saw, by scenario. The models, optimizers and DDP
    wrappers are locals here, freed when it returns."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    from asft_kernels.integrations.distributed import sharded_pair

    mesh = init_device_mesh("cpu", (WORLD,))
    rows = slice(rank * SAMPLES // WORLD, (rank + 1) * SAMPLES // WORLD)
    results = {}
    # DDP: bind the wrapped model; plain tensors, gradients averaged by DDP
    ddp = DDP(_peft_model())
    binding = _anchor().bind(ddp)
    losses, _ = _train(ddp, _optimizer(ddp, binding, DEFAULT), range(STEPS), rows)
    results["ddp"] = {"params": _lora_params(ddp.module), "losses": losses,
                      "keys": sorted(p.key for p in binding)}

    for backend in backends:
        # FSDP2: fully_shard per decoder layer and on the root; lora_A on rows or columns
        for scenario, a_columns in (("fsdp2", False), ("fsdp2_columns", True)):
            model, binding, opt = _fsdp2(mesh, backend, a_columns)
            losses, log = _train(model, opt, range(STEPS), rows, log_last=True)
            A0 = binding.pairs[0].A
            results[(scenario, backend)] = {
                "params": _lora_params(model), "losses": losses, "records": [
                    (r.op, r.sent_bytes, r.received_bytes, r.group_size) for r in log.records],
                "local_A": tuple(A0.to_local().shape), "placements": str(A0.placements),
            }

    # FSDP2 resumed from a distributed checkpoint written after RESUME_AT steps
    ckpt = os.path.join(out_dir, "ckpt")
    model, binding, opt = _fsdp2(mesh, DEFAULT)
    _train(model, opt, range(RESUME_AT), rows)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    del model, opt
    model, binding, opt = _fsdp2(mesh, DEFAULT)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    losses, _ = _train(model, opt, range(RESUME_AT, STEPS), rows)
    results["fsdp2_resumed"] = {"params": _lora_params(model), "losses": losses}

    # bf16 model and LoRA parameters
    model, binding, opt = _fsdp2(mesh, DEFAULT, dtype=torch.bfloat16)
    losses, _ = _train(model, opt, range(STEPS), rows)
    results["fsdp2_bf16"] = {"params": _lora_params(model), "losses": losses}

    # layouts anchoring refuses: B sharded on dim 1 (tensor parallelism), one of A, B sharded
    A, B = torch.randn(R, 32), torch.randn(32, R)
    bad = {"tp": (distribute_tensor(A, mesh, [Shard(1)]), distribute_tensor(B, mesh, [Shard(1)])),
           "mixed": (distribute_tensor(A, mesh, [Shard(0)]), B)}
    for label, (a, b) in bad.items():
        try:
            sharded_pair(label, a, b)
            results[f"{label}_error"] = None
        except OptimizerInputError as exc:
            results[f"{label}_error"] = str(exc)
    return results


def _worker(rank: int, rdzv: str, out_dir: str, backends: list[str]) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # a marker that interpreter teardown ran (it must not: see the module docstring)
    atexit.register(lambda: open(os.path.join(out_dir, f"teardown-{rank}"), "w").close())
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    results = _scenarios(rank, out_dir, backends)
    gc.collect()
    results["ddp_alive_at_destroy"] = sum(isinstance(o, DDP) for o in gc.get_objects())
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # results are saved: no interpreter teardown, no destructor left to deadlock


def _spawn_bounded(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    """:func:`asft_kernels.integrations.distributed.spawn_bounded`, a timeout failing the test."""
    from asft_kernels.integrations.distributed import spawn_bounded

    try:
        spawn_bounded(fn, args, nprocs, timeout_s)
    except TimeoutError as exc:
        pytest.fail(str(exc))


def _sleeper(rank: int, seconds: float) -> None:
    time.sleep(seconds)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    _spawn_bounded(_worker, (str(out / "rdzv"), str(out), BACKENDS), WORLD, SPAWN_TIMEOUT_S)
    results = torch.load(out / "results.pt", weights_only=False)
    results["teardown_markers"] = sorted(p.name for p in out.glob("teardown-*"))
    return results


@pytest.fixture(scope="module")
def single_process():
    """One process, the whole batch: AsFTAdamW (float32) per backend and the published
    formula (torch AdamW on task loss + λR, float64)."""
    out = {}
    for backend in BACKENDS:
        model = _peft_model()
        binding = _anchor().bind(model)
        losses, _ = _train(model, _optimizer(model, binding, backend), range(STEPS))
        out[backend] = {"params": _lora_params(model), "losses": losses}
    model = _peft_model(torch.float64)
    binding = _anchor().bind(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    losses = []
    for s in range(STEPS):
        ids = _batch(s)
        opt.zero_grad()
        reg = paper_regularizer(binding, LAMBDA)
        (model(input_ids=ids, labels=ids).loss + reg).backward()
        opt.step()
        losses.append(float(reg.detach()))
    out["reference"] = {"params": _lora_params(model), "losses": losses}
    model = _peft_model(torch.bfloat16, lora_dtype=torch.bfloat16)
    binding = _anchor().bind(model)
    losses, _ = _train(model, _optimizer(model, binding, DEFAULT), range(STEPS))
    out["bf16"] = {"params": _lora_params(model), "losses": losses}
    return out


def _rel_err(params: dict, ref: dict) -> float:
    assert params.keys() == ref.keys() and len(ref) == 4 * 2  # 2 layers × (q, v) × (A, B)
    worst = 0.0
    for name, p in params.items():
        q = ref[name].double()
        worst = max(worst, float((p.double() - q).abs().max() / q.abs().max()))
    return worst


def _loss_err(losses, ref) -> float:
    assert len(losses) == len(ref)
    return max(abs(a - b) / abs(b) for a, b in zip(losses, ref))


# ---------------------------------------------------------------------- tests
def test_ddp_matches_single_process(distributed_results, single_process):
    run = distributed_results["ddp"]
    assert len(run["keys"]) == 4 and all(k.startswith("model.layers.") for k in run["keys"])
    single = single_process[DEFAULT]
    assert _rel_err(run["params"], single["params"]) <= TOL
    assert _loss_err(run["losses"], single["losses"]) <= TOL
    # and the published formula, float64
    assert _rel_err(run["params"], single_process["reference"]["params"]) <= TOL
    # the anchor moved the parameters: the comparison is not between untouched inits
    init = _lora_params(_peft_model())
    assert _rel_err(run["params"], init) > 100 * TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", ["fsdp2", "fsdp2_columns"])
def test_fsdp2_matches_single_process(distributed_results, single_process, backend, scenario):
    run = distributed_results[(scenario, backend)]
    if scenario == "fsdp2":  # FSDP2's default: rows, uneven split, rank 0 holds ceil(r / 2)
        assert run["placements"] == "(Shard(dim=0),)" and run["local_A"] == (math.ceil(R / WORLD), 32)
    else:
        assert run["placements"] == "(Shard(dim=1),)" and run["local_A"] == (R, 32 // WORLD)
    single = single_process[backend]
    assert _rel_err(run["params"], single["params"]) <= TOL
    assert _loss_err(run["losses"], single["losses"]) <= TOL
    assert _rel_err(run["params"], single_process["reference"]["params"]) <= TOL
    assert _loss_err(run["losses"], single_process["reference"]["losses"]) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_step_communicates_only_small_statistics(distributed_results, backend):
    """Steady-state step: one all-reduce of every pair's P (k, r) and G (r, r), one
    all-gather of every pair's A (r, n); nothing of size m × n."""
    records = distributed_results[("fsdp2", backend)]["records"]
    model = _peft_model()
    shapes = [(mod.weight.shape[0], mod.weight.shape[1]) for name, mod in model.named_modules()
              if name.endswith(TARGETS) and hasattr(mod, "base_layer")]
    assert len(shapes) == 4
    f32 = 4
    by_op = {op: [(s, r) for o, s, r, g in records if o == op] for op in ("all_reduce", "all_gather")}
    assert len(records) == 2 and all(len(v) == 1 for v in by_op.values())
    assert by_op["all_reduce"][0] == (len(shapes) * (K * R + R * R) * f32,) * 2
    rows = math.ceil(R / WORLD)  # blocks padded to the largest shard
    sum_n = sum(n for _, n in shapes)
    assert by_op["all_gather"][0] == (rows * sum_n * f32, WORLD * rows * sum_n * f32)
    # per pair, less moves than one m × n matrix even at these toy sizes (see docs/distributed.md at 7B)
    per_pair = sum(s + r for _, s, r, _ in records) / len(shapes)
    assert per_pair < min(m * n for m, n in shapes) * f32


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_column_sharded_A_only_all_reduces(distributed_results, backend):
    """lora_A sharded on columns: one all-reduce of P (k, r), G (r, r), M (r, r) per pair."""
    records = distributed_results[("fsdp2_columns", backend)]["records"]
    pairs = 4
    assert [(op, s, r) for op, s, r, _ in records] == [("all_reduce",) + (pairs * (K * R + 2 * R * R) * 4,) * 2]


def test_fsdp2_bf16_matches_single_process(distributed_results, single_process):
    run, single = distributed_results["fsdp2_bf16"], single_process["bf16"]
    assert all(p.dtype == torch.bfloat16 for p in run["params"].values())
    # gradients are averaged in bf16 by FSDP2, so results agree to bf16 precision
    assert _rel_err(run["params"], single["params"]) <= TOL_BF16
    assert _loss_err(run["losses"], single["losses"]) <= TOL_BF16


def test_fsdp2_checkpoint_resumes_trajectory(distributed_results):
    straight = distributed_results[("fsdp2", DEFAULT)]
    resumed = distributed_results["fsdp2_resumed"]
    assert _rel_err(resumed["params"], straight["params"]) <= TOL
    assert _loss_err(resumed["losses"], straight["losses"][RESUME_AT:]) <= TOL


def test_unsupported_layouts_are_refused(distributed_results):
    message = distributed_results["tp_error"]
    assert message is not None and message.startswith("tp: lora_B") and "Shard(dim=1)" in message
    message = distributed_results["mixed_error"]
    assert message is not None and message.startswith("mixed: lora_A is a DTensor but lora_B is a plain tensor")


def test_plain_tensors_are_not_sharded():
    from asft_kernels.integrations.distributed import sharded_pair

    model = _peft_model()
    pair = _anchor().bind(model).pairs[0]
    assert sharded_pair(pair.module_name, pair.A, pair.B) is None


def test_collectives_are_not_recorded_outside_a_block():
    from asft_kernels.integrations.distributed import _ACTIVE_LOGS

    with record_collectives() as log:
        assert _ACTIVE_LOGS == [log]
    assert _ACTIVE_LOGS == [] and log.count() == 0 and log.largest_message_bytes == 0



def test_workers_end_without_the_deadlocking_teardown(distributed_results):
    """No DDP wrapper is alive when the group is destroyed, and no worker ran interpreter teardown."""
    assert distributed_results["ddp_alive_at_destroy"] == 0
    assert distributed_results["teardown_markers"] == []


def test_a_hung_spawn_fails_within_its_bound():
    import torch.multiprocessing as mp

    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish within 3 s"):
        _spawn_bounded(_sleeper, (600.0,), 2, 3)
    assert time.monotonic() - start < 60
    assert mp.active_children() == []


def test_comm_report_gives_up_after_its_timeout(capsys):
    """``asft comm-report --timeout``: workers that have not finished are killed and the
    command fails naming the bound, instead of waiting forever on a stuck collective."""
    import torch.multiprocessing as mp

    from asft_kernels.cli import main as asft_main

    start = time.monotonic()
    rc = asft_main(["comm-report", "--timeout", "0.2", "--pairs", "1", "--m", "8", "--n", "8", "--r", "2",
                    "--k", "2"])
    assert rc == 1
    assert "did not finish within 0.2 s" in capsys.readouterr().err
    assert time.monotonic() - start < 60
    assert mp.active_children() == []
