"""``asft demo --quick``: the end-to-end safety demo runs and writes well-formed results."""

from __future__ import annotations

import json

import pytest

from asft_kernels.cli import main

METRICS = ("harmful_rate", "task_accuracy")


def _check_metrics(where: str, entry: dict) -> None:
    for key in METRICS:
        assert key in entry, f"{where} lacks {key}"
        value = entry[key]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, f"{where}.{key} = {value!r}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quick", "--seed", "0", "--no-progress"]) == 0
    return out


def test_quick_results_schema(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    assert {"aligned", "methods", "sweep", "config"} <= set(results)
    _check_metrics("aligned", results["aligned"])
    assert set(results["methods"]) == {"sft", "safe_lora", "asft"}
    for name, entry in results["methods"].items():
        _check_metrics(f"methods.{name}", entry)
    cfg = results["config"]
    assert cfg["quick"] is True and cfg["seed"] == 0
    modes, lambdas = set(cfg["sweep_modes"]), set(cfg["sweep_lambdas"])
    assert {(s["mode"], s["anchor_lambda"]) for s in results["sweep"]} == {(m, lam) for m in modes for lam in lambdas}
    for s in results["sweep"]:
        _check_metrics(f"sweep {s['mode']} λ={s['anchor_lambda']}", s)
    # λ = 0 is plain AdamW: the same run as sft
    for s in results["sweep"]:
        if s["anchor_lambda"] == 0.0:
            assert {k: s[k] for k in METRICS} == results["methods"]["sft"]
    main_setting = [s for s in results["sweep"]
                    if s["mode"] == cfg["asft_mode"] and s["anchor_lambda"] == cfg["asft_lambda"]]
    assert [{k: s[k] for k in METRICS} for s in main_setting] == [results["methods"]["asft"]]
    png = (quick_run / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_uses_the_cache(quick_run):
    """Stages 1–3 of a second run load the cached tokenizer and models instead of training."""
    from asft_kernels.demo.data import build_corpora
    from asft_kernels.demo.experiment import DemoConfig, _pretrain

    first = json.loads((quick_run / "results.json").read_text())
    assert first["config"]["pretrain_cached"] is False
    cfg = DemoConfig.quick_config(0)
    cache = quick_run / first["config"]["pretrain_cache"]
    assert cache.name == cfg.pretrain_key()
    again = _pretrain(cfg, build_corpora(cfg.seed, cfg.sizes), cache, progress=False)
    assert again.cached is True
    assert again.info["vocab_size"] == len(again.tokenizer) == again.aligned.config.vocab_size
    deltas = [(a - b).abs().max().item() for a, b in zip(again.aligned.parameters(), again.base.parameters())]
    assert max(deltas) > 0  # the aligned model is not the base


def test_bad_seed_is_rejected(tmp_path, capsys):
    # every asft command: an ordinary error is one line on stderr and exit status 1
    assert main(["demo", "--out", str(tmp_path), "--seed", "-1", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "--seed" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()
