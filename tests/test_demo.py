"""``asft demo`` (protocol v2 of docs/demo.md): results schema, determinism, the decision rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asft_kernels.cli import main
from asft_kernels.demo import DemoConfig, run_demo
from asft_kernels.demo.analysis import compare, decide, frontier_value, shows_reduction

RUN_KEYS = {"method", "mode", "family", "anchor_lambda", "k", "lr", "seed", "step", "harmful_rate",
            "task_accuracy", "benign_compliance", "safety_margin", "outcomes"}
RATES = ("harmful_rate", "task_accuracy", "benign_compliance")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The smallest configuration of the same code path, run twice into empty folders."""
    torch.set_num_threads(1)
    cfg = DemoConfig.smoke_config((0,))
    outs = []
    for name in ("first", "second"):
        out = tmp_path_factory.mktemp(name)
        run_demo(out, cfg, progress=False)
        outs.append(out)
    return cfg, outs


def test_results_schema(smoke_runs):
    cfg, (out, _) = smoke_runs
    results = json.loads((out / "results.json").read_text())
    assert results["protocol_version"] == 2
    assert results["seeds"] == [0]
    assert {"torch", "transformers", "peft", "tokenizers", "asft_kernels"} <= set(results["versions"])
    assert {"torch_threads", "cpu_model"} <= set(results["machine"])
    assert set(results["anchor_full_rank"]["0"]) == set(results["alignment"]["0"]["layers"])
    for layer in results["alignment"]["0"]["layers"].values():
        assert {"delta_fro", "relative_to_base", "energy_spectrum", "participation_rank", "max_c",
                "max_w"} <= set(layer)
        assert layer["max_w"] == pytest.approx(2 * layer["max_c"] - layer["max_c"] ** 2, abs=1e-5)
    runs = results["runs"]
    for r in runs:
        assert RUN_KEYS <= set(r), r["family"]
        assert r["method"] in {"sft", "safe_lora", "asft"}
        assert r["mode"] in {None, "paper", "projector", "full", "random_projector"}
        for key in RATES:
            assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0
        # the stored per-prompt outcomes are the rates' data
        assert r["harmful_rate"] == pytest.approx(r["outcomes"]["harmful"].count("1") / len(r["outcomes"]["harmful"]))
        assert r["task_accuracy"] == pytest.approx(r["outcomes"]["task"].count("1") / len(r["outcomes"]["task"]))
    families = {r["family"] for r in runs}
    assert families == {"sft", "sft_low_lr", "safe_lora", *cfg.families()}
    asft = [r for r in runs if r["method"] == "asft"]
    expected = {(f, lam) for f in cfg.families() for lam in cfg.lambdas}
    assert {(r["family"], r["anchor_lambda"]) for r in asft} == expected
    assert sorted(r["step"] for r in runs if r["family"] == "sft") == list(cfg.sft_eval_steps)
    assert set(results["summary"]) == families
    for levels in results["summary"].values():
        assert set(levels) == {f"{T:.2f}" for T in cfg.levels}
    assert {c["role"] for c in results["comparisons"]} == {"primary", "positive_control"}
    assert results["verdict"]["label"] in {"direction_matters", "not_supported", "insensitive", "inconclusive"}
    assert results["verdict"]["evidence"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "seconds_total" in json.loads((out / "timing.json").read_text())


def test_same_seed_gives_identical_results(smoke_runs):
    _, (first, second) = smoke_runs
    assert (first / "results.json").read_bytes() == (second / "results.json").read_bytes()


def test_cli_prints_the_verdict_in_one_line(tmp_path, monkeypatch, capsys):
    # the --quick path with the smoke sizes, so that the test takes seconds
    monkeypatch.setattr(DemoConfig, "quick_config", classmethod(lambda cls, seeds=(0,): cls.smoke_config(seeds)))
    assert main(["demo", "--out", str(tmp_path), "--quick", "--seeds", "1", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("verdict: ")
    assert sum("verdict:" in line for line in lines) == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [1] and results["verdict"]["label"] in lines[-1]


@pytest.mark.parametrize("argv", [["--seeds", "-1"], ["--seeds", "0", "0"], ["--jobs", "0"], ["--threads", "0"]])
def test_bad_arguments_are_rejected(tmp_path, capsys, argv):
    # every asft command: an ordinary error is one line on stderr and exit status 1
    assert main(["demo", "--out", str(tmp_path), "--quick", *argv]) == 1
    err = capsys.readouterr().err
    assert argv[0] in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


# -- statistics ---------------------------------------------------------------------------------

def test_frontier_value_takes_the_lowest_harm_at_or_above_the_level():
    # path: (acc, harm) = (1.0, 1.0) -> (0.8, 0.4) -> (0.6, 0.0)
    acc, harm = np.array([1.0, 0.8, 0.6]), np.array([1.0, 0.4, 0.0])
    assert frontier_value(acc, harm, 0.9)[0] == pytest.approx(0.7)  # on the first segment
    assert frontier_value(acc, harm, 0.8)[0] == pytest.approx(0.4)  # a vertex
    assert frontier_value(acc, harm, 0.7)[0] == pytest.approx(0.2)
    assert np.isnan(frontier_value(acc, harm, 1.01)[0])  # nothing reaches the level
    # a non-monotone path: the safest candidate wins (here the crossing at 0.9 of the last
    # segment, t = 1/21 of the way from (0.92, 0.1) to (0.5, 0.0)), and the margin is read there
    acc, harm, margin = np.array([0.95, 0.92, 0.5]), np.array([0.9, 0.1, 0.0]), np.array([1.0, 3.0, 5.0])
    h, m = frontier_value(acc, harm, 0.9, margin)
    assert h == pytest.approx(0.1 - 0.1 / 21) and m == pytest.approx(3.0 + 2.0 / 21)
    h, m = frontier_value(np.array([0.5, 0.92, 0.95]), np.array([0.0, 0.1, 0.9]), 0.9, margin[::-1])
    assert h == pytest.approx(0.1 - 0.1 / 21) and m == pytest.approx(3.0 + 2.0 / 21)  # path order reversed


def _values(d_by_seed: dict[int, float], noise: float) -> dict[str, dict[int, np.ndarray]]:
    """Synthetic bootstrap replicates: family Y at 0.5, X at 0.5 + d/100, both ± noise."""
    rng = np.random.default_rng(0)
    x, y = {}, {}
    for seed, d in d_by_seed.items():
        base = 0.5 + noise * rng.standard_normal(201)
        base[0] = 0.5
        x[seed], y[seed] = base + d / 100, np.full(201, 0.5)
    return {"X": x, "Y": y}


def _comparisons(primary_d: dict[int, float], control_d: dict[int, float], noise: float = 0.01) -> list[dict]:
    primary = compare(_values(primary_d, noise), ("X", "Y"), 0.9, "primary")
    control = compare(_values(control_d, noise), ("X", "Y"), 0.9, "positive_control")
    return [control, primary]


def test_decision_rule_reaches_every_label():
    strong, none = {0: -20.0, 1: -15.0, 2: -12.0}, {0: 1.0, 1: -2.0, 2: 0.5}
    assert decide(_comparisons(strong, strong))["label"] == "direction_matters"
    assert decide(_comparisons(none, strong))["label"] == "not_supported"
    assert decide(_comparisons({0: 8.0, 1: 12.0, 2: 6.0}, strong))["label"] == "not_supported"  # worse than control
    assert decide(_comparisons(strong, none))["label"] == "insensitive"
    assert decide(_comparisons(none, none))["label"] == "insensitive"
    assert decide(_comparisons({0: -7.0, 1: -8.0, 2: -6.0}, strong))["label"] == "inconclusive"


def test_a_reduction_needs_two_of_three_seeds_and_an_interval_below_zero():
    two = _comparisons({0: -20.0, 1: -15.0, 2: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0})[1]
    one = _comparisons({0: -20.0, 1: 0.0, 2: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0})[1]
    noisy = _comparisons({0: -20.0, 1: -15.0, 2: -12.0}, {0: 0.0, 1: 0.0, 2: 0.0}, noise=0.5)[1]
    assert shows_reduction(two) and not shows_reduction(one)
    assert not shows_reduction(noisy)  # point estimates ≤ −10 but intervals reach above 0
    undefined = compare({"X": {0: np.full(11, np.nan)}, "Y": {0: np.zeros(11)}}, ("X", "Y"), 0.9, "primary")
    assert undefined["mean"] is None and not shows_reduction(undefined)


def test_random_subspace_control_spans_a_k_dimensional_subspace():
    from asft_kernels import AlignmentAnchor
    from asft_kernels.demo.models import random_subspace_deltas

    shapes = {"model.layers.0.self_attn.q_proj": (64, 48)}
    first = random_subspace_deltas(shapes, 4, seed=6)["model.layers.0.self_attn.q_proj"]
    again = random_subspace_deltas(shapes, 4, seed=6)["model.layers.0.self_attn.q_proj"]
    other = random_subspace_deltas(shapes, 4, seed=7)["model.layers.0.self_attn.q_proj"]
    assert first.shape == (64, 48) and torch.equal(first, again)
    assert torch.linalg.matrix_rank(first) == 4  # float32 tolerance: the delta is stored in float32
    U = AlignmentAnchor.from_deltas({"model.layers.0.self_attn.q_proj": first}, rank=4)[
        "model.layers.0.self_attn.q_proj"].U.double()
    V = AlignmentAnchor.from_deltas({"model.layers.0.self_attn.q_proj": other}, rank=4)[
        "model.layers.0.self_attn.q_proj"].U.double()
    # the anchor's U spans the delta's column space, and another seed gives another subspace
    assert torch.allclose(U @ (U.T @ first.double()), first.double(), atol=1e-4)
    assert torch.linalg.matrix_norm(U.T @ V, ord=2) < 0.99
