"""The examples' code paths, run in-process on tiny models through their flags."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from asft_kernels import AlignmentAnchor
from asft_kernels.diagnostics import adapter_report

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"asft_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _check_run(result, steps: int, residual_step: int):
    logs = [h for h in result["trainer"].state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, steps + 1))
    assert all(h["anchor_loss"] >= 0.0 for h in logs)
    # PEFT's default init has B = 0: nothing to anchor before the first step, then R > 0
    assert logs[0]["anchor_loss"] == 0.0 and logs[-1]["anchor_loss"] > 0.0
    with_residuals = [h["step"] for h in logs if "anchor_residual_mean" in h]
    assert with_residuals == list(range(residual_step, steps + 1, residual_step))
    anchor = AlignmentAnchor.load(result["anchor_path"])
    saved = adapter_report(result["adapter_dir"], anchor)
    assert [r.key for r in saved] == [r.key for r in result["rows"]] == sorted(anchor)
    for a, b in zip(saved, result["rows"]):
        assert a.residual_fraction == pytest.approx(b.residual_fraction, rel=1e-6)


def test_finetune_trainer_example(tmp_path):
    example = _load("finetune_trainer")
    result = example.main(["--output-dir", str(tmp_path), "--max-steps", "3", "--residual-every", "2",
                           "--batch-size", "4"])
    _check_run(result, steps=3, residual_step=2)
    assert set(result["safe_lora"].similarity) == set(result["anchor"])


def test_llama2_agnews_example_tiny(tmp_path):
    example = _load("llama2_7b_agnews")
    result = example.main(["--tiny-smoke-test", "--output-dir", str(tmp_path), "--max-steps", "3",
                           "--logging-steps", "1", "--residual-every", "3", "--anchor-rank", "8"])
    _check_run(result, steps=3, residual_step=3)
    assert (tmp_path / "alignment.png").is_file()
    # the anchor was built from the two tiny checkpoints: rank-3 deltas on q/v of 2 layers
    anchor = result["anchor"]
    assert len(anchor) == 4 and all(anchor[k].rank == 3 for k in anchor)
    assert result["trainer"].model.peft_config["default"].r == 8


def test_agnews_data_masks_the_prompt(tmp_path):
    example = _load("llama2_7b_agnews")
    paths = example.write_tiny_setup(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(paths["aligned"]))
    data = example.load_asft_json(paths["train_json"], tokenizer, max_length=512)
    records = json.loads(paths["train_json"].read_text())
    assert len(data) == len(records)
    for row, record in zip(data, records):
        answer = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]).replace(" ", "") == record["output"].replace(" ", "")
        assert len(row["input_ids"]) == len(row["labels"])


def test_llama2_example_needs_paths(tmp_path):
    example = _load("llama2_7b_agnews")
    with pytest.raises(SystemExit):
        example.parse_args(["--output-dir", str(tmp_path)])
