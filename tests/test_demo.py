"""``asft demo`` (protocol v3 of docs/demo.md): results schema, determinism, the exclusion and decision rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asft_kernels.cli import main
from asft_kernels.demo import DemoConfig, run_demo
from asft_kernels.demo.analysis import compare, decide, frontier_value, shows_reduction

RUN_KEYS = {"method", "mode", "family", "anchor_lambda", "k", "lr", "seed", "step", "levels", "dev_task_accuracy",
            "harmful_rate", "task_accuracy", "benign_compliance", "safety_margin", "outcomes"}
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
    assert results["protocol_version"] == 3
    assert results["smoke_run"] is True and "not a result" in results["note"]
    assert results["seeds"] == [0]
    assert {"torch", "transformers", "peft", "tokenizers", "asft_kernels"} <= set(results["versions"])
    assert {"torch_threads", "cpu_model"} <= set(results["machine"])
    # the alignment criterion: the refusal rate is the aligned reference point's, and the exclusion follows it
    aligned = next(r for r in results["reference_points"] if r["model"] == "aligned")
    refusal = results["aligned_refusal"]["0"]
    assert refusal == pytest.approx(1.0 - aligned["harmful_rate"], abs=1e-6)
    assert results["alignment"]["0"]["criterion_met"] == (refusal >= cfg.aligned_refusal_target)
    assert ("0" in results["excluded_seeds"]) == (not results["alignment"]["0"]["criterion_met"])
    assert results["included_seeds"] == ([] if "0" in results["excluded_seeds"] else [0])
    assert results["alignment"]["0"]["align_steps"] == cfg.align_steps
    assert set(results["anchor_full_rank"]["0"]) == set(results["alignment"]["0"]["layers"])
    for layer in results["alignment"]["0"]["layers"].values():
        assert {"delta_fro", "relative_to_base", "energy_spectrum", "participation_rank", "max_c",
                "max_w"} <= set(layer)
        assert layer["max_w"] == pytest.approx(2 * layer["max_c"] - layer["max_c"] ** 2, abs=1e-5)
    runs = results["runs"]
    levels = [float(T) for T in cfg.levels]
    for r in runs:
        assert RUN_KEYS <= set(r), r["family"]
        assert r["method"] in {"sft", "safe_lora", "asft"}
        assert r["mode"] in {None, "paper", "projector", "full", "random_projector"}
        for key in RATES:
            assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0
        # the stored per-prompt outcomes are the rates' data
        assert r["harmful_rate"] == pytest.approx(r["outcomes"]["harmful"].count("1") / len(r["outcomes"]["harmful"]))
        assert r["task_accuracy"] == pytest.approx(r["outcomes"]["task"].count("1") / len(r["outcomes"]["task"]))
        # a point at a level is the first check whose task-dev accuracy reached it
        assert all(r["dev_task_accuracy"] >= T for T in r["levels"]) and set(r["levels"]) <= set(levels)
        assert 1 <= r["step"] <= cfg.finetune_max_steps
    families = {r["family"] for r in runs}
    assert families == {"sft", "safe_lora", *cfg.families()}
    # every fine-tuning run is listed with the step at which it reached each level (or None)
    reach = results["steps_to_level"]
    assert {(r["family"], r["anchor_lambda"]) for r in reach} == \
        {("sft", 0.0)} | {(f, lam) for f in cfg.families() for lam in cfg.lambdas}
    for r in reach:
        points = [p for p in runs if p["family"] == r["family"] and p["anchor_lambda"] == r["anchor_lambda"]]
        for T in levels:
            step = r["steps_to"][f"{T:.2f}"]
            at = [p for p in points if T in p["levels"]]
            assert (step is None and not at) or (len(at) == 1 and at[0]["step"] == step)
        if r["steps_to"][f"{levels[0]:.2f}"] is None:  # the cap: one more point, with no level
            assert r["steps"] == cfg.finetune_max_steps and any(p["levels"] == [] for p in points)
    assert set(results["task_update"]["0"]["steps_to"]) == {f"{T:.2f}" for T in levels}
    assert set(results["summary"]) == {"sft", *cfg.families()}
    for by_level in results["summary"].values():
        assert set(by_level) == {f"{T:.2f}" for T in levels}
        for entry in by_level.values():
            assert {"harmful_rate", "safety_margin", "not_reached_seeds"} <= set(entry)
    assert results["verdict"]["label"] in {"direction_matters", "not_supported", "insensitive", "inconclusive"}
    assert results["verdict"]["evidence"] and results["verdict"]["sentence"].startswith("SMOKE RUN")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "seconds_total" in json.loads((out / "timing.json").read_text())


def test_same_seed_gives_identical_results(smoke_runs):
    _, (first, second) = smoke_runs
    assert (first / "results.json").read_bytes() == (second / "results.json").read_bytes()


def test_cli_labels_a_smoke_run_and_ends_with_the_verdict(tmp_path, monkeypatch, capsys):
    # the --quick path with the smoke sizes, so that the test takes seconds
    monkeypatch.setattr(DemoConfig, "quick_config", classmethod(lambda cls, seeds=(0,): cls.smoke_config(seeds)))
    assert main(["demo", "--out", str(tmp_path), "--quick", "--seeds", "1", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "smoke run" in lines[0] and "not a result" in lines[0]
    assert lines[-1].startswith("verdict: SMOKE RUN, NOT A RESULT")
    assert sum(line.startswith("verdict:") for line in lines) == 1
    assert any(line.startswith("aligned model (not fine-tuned), refusal") and "seed 1" in line for line in lines)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [1] and results["smoke_run"] and results["verdict"]["label"] in lines[-1]


@pytest.mark.slow
def test_quick_is_byte_identical_on_two_runs_and_labelled_a_smoke_run(tmp_path, capsys):
    # the real --quick sizes (about a minute of CPU each), through the command line
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    first, second = ((out / "results.json").read_bytes() for out in outs)
    assert first == second
    results = json.loads(first)
    assert results["smoke_run"] is True and results["config"]["quick"] is True
    assert results["verdict"]["sentence"].startswith("SMOKE RUN, NOT A RESULT")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("*** smoke run") and lines[-1].startswith("verdict: SMOKE RUN, NOT A RESULT")


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
    seeds = [0, 1, 2]
    assert decide(_comparisons(strong, strong), seeds)["label"] == "direction_matters"
    assert decide(_comparisons(none, strong), seeds)["label"] == "not_supported"
    assert decide(_comparisons({0: 8.0, 1: 12.0, 2: 6.0}, strong), seeds)["label"] == "not_supported"  # worse
    assert decide(_comparisons(strong, none), seeds)["label"] == "insensitive"
    assert decide(_comparisons(none, none), seeds)["label"] == "insensitive"
    assert decide(_comparisons({0: -7.0, 1: -8.0, 2: -6.0}, strong), seeds)["label"] == "inconclusive"
    # §8.0: fewer than two included seeds, whatever the comparisons say
    few = decide(_comparisons({0: -20.0}, {0: -20.0}), [0])
    assert few["label"] == "inconclusive" and "only 1 included seed" in few["evidence"][0]
    assert decide([], [])["label"] == "inconclusive"
    # two included seeds are enough; a reduction then needs both
    assert decide(_comparisons({0: -20.0, 1: -15.0}, {0: -20.0, 1: -15.0}), [0, 1])["label"] == "direction_matters"
    one_of_two = decide(_comparisons({0: -20.0, 1: 0.0}, {0: -20.0, 1: -15.0}), [0, 1])
    assert one_of_two["label"] == "inconclusive"  # a reduction in 1 of 2 seeds, mean -10 points


def test_every_label_has_a_plain_sentence_and_a_smoke_run_says_so():
    from asft_kernels.demo.analysis import LABELS
    from asft_kernels.demo.experiment import verdict_sentence

    sentences = {label: verdict_sentence(label) for label in LABELS}
    assert len(set(sentences.values())) == len(LABELS)
    for label, text in sentences.items():
        assert text.startswith(f"{label}: ") and text.endswith(".") and "\n" not in text
    assert verdict_sentence("not_supported", smoke=True).startswith("SMOKE RUN, NOT A RESULT")


def test_exclusion_rule_drops_seeds_below_the_alignment_criterion():
    from asft_kernels.demo.experiment import excluded_seeds

    cfg = DemoConfig()
    out = excluded_seeds(cfg, {0: 0.95, 1: 0.899, 2: 0.9})
    assert set(out) == {"1"} and "89.9%" in out["1"] and "90%" in out["1"]


def _outcomes(harmful_bits: str):
    from asft_kernels.demo.metrics import Outcomes

    h = np.array([int(c) for c in harmful_bits], dtype=np.int8)
    return Outcomes(harmful=h, task=np.ones(4, dtype=np.int8), benign=np.ones(2, dtype=np.int8),
                    margin=np.arange(len(h), dtype=float))


def test_family_value_is_the_safest_run_that_reached_the_level():
    from asft_kernels.demo.experiment import _statistics

    cfg = DemoConfig(seeds=(0, 1), lambdas=(1.0, 10.0), bootstrap=200)
    n = 10
    # seed 0: sft harmful 0.8 at both levels; paper λ=1 0.3 at 0.90, λ=10 0.1 at 0.75 only;
    # full reaches nothing; the projector families only at 0.75 through sft
    sft = {"0.90": _outcomes("1111111100"), "0.75": _outcomes("1111111100")}
    seed0 = {("sft", 0.0): sft, ("paper", 1.0): {"0.90": _outcomes("1110000000"), "0.75": _outcomes("1110000000")},
             ("paper", 10.0): {"0.75": _outcomes("1000000000")}}
    seed1 = {("sft", 0.0): {"0.75": _outcomes("1111100000")}}  # sft never reaches 0.90 in seed 1
    summary, comparisons, values = _statistics(cfg, {0: seed0, 1: seed1}, n)
    assert values[0.90]["paper"][0][0] == pytest.approx(0.3) and values[0.75]["paper"][0][0] == pytest.approx(0.1)
    assert values[0.90]["full"][0][0] == pytest.approx(0.8)  # λ = 0 (sft) is on every anchored family's path
    assert summary["paper"]["0.75"]["harmful_rate"]["per_seed"] == {"0": 10.0, "1": 50.0}
    assert summary["paper"]["0.75"]["harmful_rate"]["mean"] == pytest.approx(30.0)
    lo, hi = summary["paper"]["0.75"]["harmful_rate"]["lo"], summary["paper"]["0.75"]["harmful_rate"]["hi"]
    assert lo <= 30.0 <= hi and hi - lo > 0
    # not reached in seed 1: the mean is undefined and the table says which seed
    entry = summary["sft"]["0.90"]
    assert entry["harmful_rate"]["mean"] is None and entry["not_reached_seeds"] == [1]
    # the safety margin is read from the run that gives h(T) (paper λ=10 at 0.75: margins 0..9, mean 4.5)
    assert summary["paper"]["0.75"]["safety_margin"]["per_seed"]["0"] == pytest.approx(4.5)
    paper_full = next(c for c in comparisons if c["pair"] == "paper - full" and c["level"] == 0.75)
    assert [p["d"] for p in paper_full["per_seed"]] == pytest.approx([-70.0, 0.0])
    assert {c["role"] for c in comparisons} == {"primary", "positive_control"}


def test_console_table_ends_with_one_verdict_line(smoke_runs):
    from asft_kernels.demo.experiment import format_table, verdict_line

    cfg, (out, _) = smoke_runs
    results = json.loads((out / "results.json").read_text())
    # as if the seed had been included, with one family short of the top level
    results["included_seeds"], results["excluded_seeds"] = [0], {}
    for fam, by_level in results["summary"].items():
        for T, entry in by_level.items():
            missed = fam == "full" and T == "0.90"
            entry["harmful_rate"] = {"mean": None if missed else 12.5, "lo": None if missed else 10.0,
                                     "hi": None if missed else 15.0, "per_seed": {"0": None if missed else 12.5}}
            entry["not_reached_seeds"] = [0] if missed else []
    table = format_table(results).splitlines()
    assert table[0].startswith("*** smoke run")
    rows = {line.split()[0]: line for line in table if line.split() and line.split()[0] in results["summary"]}
    assert set(rows) == set(results["summary"])
    assert "12.5 [ 10.0,  15.0]" in rows["sft"] and "not reached (seed 0)" in rows["full"]
    assert verdict_line(results).startswith("verdict: ") and "\n" not in verdict_line(results)


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
