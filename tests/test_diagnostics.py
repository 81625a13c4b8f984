"""alignment_report / adapter_report / ``asft report`` against dense float64 formulas."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import lora, tiny_llama

from asft_kernels import AlignmentAnchor
from asft_kernels.cli import main as asft_main
from asft_kernels.diagnostics import adapter_report, alignment_report, format_report
from asft_kernels.errors import AnchorMismatchError, AsFTError, UnsupportedAdapterError
from asft_kernels.reference import dense_projection

TARGETS = ("q_proj", "v_proj")


def _setup():
    base = tiny_llama(torch.float64)
    gen = torch.Generator().manual_seed(2)
    deltas = {n: 0.2 * torch.randn(m.weight.shape[0], 2, generator=gen, dtype=torch.float64)
              @ torch.randn(2, m.weight.shape[1], generator=gen, dtype=torch.float64)
              for n, m in base.named_modules() if n.split(".")[-1] in TARGETS}
    anchor = AlignmentAnchor.from_deltas(deltas, dtype=torch.float64)
    model = lora(base, r=3, targets=TARGETS)
    return model, anchor


@pytest.mark.parametrize("mode", ["paper", "projector", "full"])
def test_report_matches_dense_formulas(mode):
    model, anchor = _setup()
    rows = alignment_report(model, anchor, mode=mode)
    binding = anchor.bind(model, mode=mode)
    assert [r.key for r in rows] == [p.key for p in binding]
    for row, pair in zip(rows, binding):
        BA = (pair.B @ pair.A).detach()
        C = dense_projection(pair, dtype=torch.float64, device="cpu")
        Uk = pair.entry.U.double()
        norm = torch.linalg.matrix_norm(BA)
        assert row.delta_norm == pytest.approx(float(norm), rel=1e-12)
        assert row.residual_fraction == pytest.approx(float(torch.linalg.matrix_norm(BA - C @ BA) / norm), rel=1e-10)
        assert row.subspace_cosine == pytest.approx(float(torch.linalg.matrix_norm(Uk @ (Uk.T @ BA)) / norm),
                                                    rel=1e-10)
        expected_cos = torch.nn.functional.cosine_similarity((C @ BA).reshape(1, -1), BA.reshape(1, -1)).item()
        assert row.projection_cosine == pytest.approx(expected_cos, abs=1e-12)
        assert row.rank == 3 and row.lora_scaling == pytest.approx(2.0)
    if mode == "full":
        assert all(r.residual_fraction == pytest.approx(1.0) for r in rows)


def test_zero_update_gives_nan_fractions():
    model, anchor = _setup()
    with torch.no_grad():
        for pair in anchor.bind(model):
            pair.B.zero_()
    rows = alignment_report(model, anchor)
    assert all(r.delta_norm == 0.0 and r.residual_fraction != r.residual_fraction for r in rows)
    assert "mean residual" not in format_report(rows)


def test_saved_adapter_and_cli(tmp_path, capsys):
    model, anchor = _setup()
    adapter_dir, anchor_path = tmp_path / "adapter", tmp_path / "anchor.safetensors"
    model.save_pretrained(str(adapter_dir))
    anchor.save(anchor_path)
    live = alignment_report(model, anchor, mode="projector")
    saved = adapter_report(adapter_dir, anchor_path, mode="projector")
    assert [r.key for r in saved] == [r.key for r in live]
    for a, b in zip(saved, live):
        assert a.residual_fraction == pytest.approx(b.residual_fraction, rel=1e-12)
        assert a.subspace_cosine == pytest.approx(b.subspace_cosine, rel=1e-12)
        assert a.delta_norm == pytest.approx(b.delta_norm, rel=1e-12)
        assert a.lora_scaling == pytest.approx(b.lora_scaling)

    png, js = tmp_path / "report.png", tmp_path / "report.json"
    rc = asft_main(["report", str(adapter_dir), str(anchor_path), "--mode", "projector", "--plot", str(png),
                    "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert all(r.key in out for r in live)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(js.read_text())
    assert [r["residual_fraction"] for r in rows] == pytest.approx([r.residual_fraction for r in live], rel=1e-12)


def test_cli_errors_write_nothing(tmp_path, capsys):
    model, anchor = _setup()
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(str(adapter_dir))
    # an anchor for a different architecture: shapes do not match
    wrong = AlignmentAnchor.from_deltas({k: torch.randn(5, 7, dtype=torch.float64) for k in anchor})
    wrong_path = tmp_path / "wrong.safetensors"
    wrong.save(wrong_path)
    png = tmp_path / "report.png"
    assert asft_main(["report", str(adapter_dir), str(wrong_path), "--plot", str(png)]) == 1
    assert "q_proj" in capsys.readouterr().err and not png.exists()
    with pytest.raises(AnchorMismatchError, match=r"\(5, 7\)"):
        adapter_report(adapter_dir, wrong_path)
    assert asft_main(["report", str(tmp_path / "missing"), str(wrong_path)]) == 1

    dora_dir = tmp_path / "dora"
    shutil.copytree(adapter_dir, dora_dir)
    config = json.loads((dora_dir / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora_dir / "adapter_config.json").write_text(json.dumps(config))
    anchor_path = tmp_path / "anchor.safetensors"
    anchor.save(anchor_path)
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        adapter_report(dora_dir, anchor_path)


def _saved(tmp_path):
    model, anchor = _setup()
    adapter_dir, anchor_path = tmp_path / "adapter", tmp_path / "anchor.safetensors"
    model.save_pretrained(str(adapter_dir))
    anchor.save(anchor_path)
    return model, anchor, adapter_dir, anchor_path


def _one_line(err):
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("asft report: error: "), err
    return err


def test_swapped_arguments_are_detected(tmp_path, capsys):
    _, _, adapter_dir, anchor_path = _saved(tmp_path)
    with pytest.raises(AsFTError, match="swapped.*anchor file.*adapter directory.*ADAPTER ANCHOR"):
        adapter_report(anchor_path, adapter_dir)
    assert asft_main(["report", str(anchor_path), str(adapter_dir)]) == 1
    assert "swapped" in _one_line(capsys.readouterr().err)
    # an anchor file first and no anchor second: the order is wrong whatever the second is
    with pytest.raises(AsFTError, match="swapped"):
        adapter_report(anchor_path, tmp_path / "missing")
    # an adapter directory where the anchor file belongs
    with pytest.raises(AsFTError, match="is an adapter directory, not an anchor file"):
        adapter_report(adapter_dir, adapter_dir)


def test_untrained_adapter_says_no_update_yet(tmp_path, capsys):
    model, anchor = _setup()
    with torch.no_grad():
        for pair in anchor.bind(model):
            pair.B.zero_()
    rows = alignment_report(model, anchor)
    text = format_report(rows)
    assert "nan" not in text.lower()
    assert text.count("no update yet (B A = 0)") == len(rows)
    assert "the adapter has no update yet" in text
    adapter_dir, anchor_path = tmp_path / "adapter", tmp_path / "anchor.safetensors"
    model.save_pretrained(str(adapter_dir))
    anchor.save(anchor_path)
    assert asft_main(["report", str(adapter_dir), str(anchor_path)]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "the adapter has no update yet" in out


def test_cli_explains_the_columns_and_the_plot_says_which_way_is_drift(tmp_path, capsys, monkeypatch):
    _, _, adapter_dir, anchor_path = _saved(tmp_path)
    assert asft_main(["report", str(adapter_dir), str(anchor_path)]) == 0
    out = capsys.readouterr().out
    for column in ("resid", "cos_sub", "cos_CBA", "|BA|_F"):
        assert any(line.startswith(column + " ") for line in out.splitlines()), column
    assert "more drift" in out
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    asft_main(["report", str(adapter_dir), str(anchor_path), "--plot", str(tmp_path / "r.png")])
    labels = figures[0].axes[0].get_legend_handles_labels()[1]
    assert any("higher = more drift" in label for label in labels)
    assert any("lower = more drift" in label for label in labels)


def test_cli_unwritable_outputs_fail_before_any_work(tmp_path, capsys):
    _, _, adapter_dir, anchor_path = _saved(tmp_path)
    (tmp_path / "out.json").mkdir()
    assert asft_main(["report", str(adapter_dir), str(anchor_path), "--json", str(tmp_path / "out.json")]) == 1
    assert "--json" in _one_line(capsys.readouterr().err)
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert asft_main(["report", str(adapter_dir), str(anchor_path), "--plot", str(plain / "r.png")]) == 1
    captured = capsys.readouterr()
    assert "--plot" in _one_line(captured.err)
    assert captured.out == ""  # no table printed: the output is checked before the report


def test_saved_adapter_with_embedding_lora_reports_the_embedding(tmp_path):
    """An adapter with LoRA on an nn.Embedding saves ``*.lora_embedding_A/B`` (no
    ``.weight``): the saved-adapter report covers that module as the live one does, instead
    of leaving it out (also under strict, which used to pass with the module missing)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5)).double()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))
    gen = torch.Generator().manual_seed(3)
    deltas = {"0": torch.randn(6, 11, generator=gen, dtype=torch.float64),  # (W_aligned − W_base)ᵀ
              "1": torch.randn(5, 6, generator=gen, dtype=torch.float64)}
    anchor = AlignmentAnchor.from_deltas(deltas, rank=2, dtype=torch.float64)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(str(adapter_dir))
    live = alignment_report(model, anchor)
    saved = adapter_report(adapter_dir, anchor)
    assert sorted(r.key for r in live) == sorted(r.key for r in saved) == ["0", "1"]
    by_key = {r.key: r for r in saved}
    for row in live:
        assert by_key[row.key].residual_fraction == pytest.approx(row.residual_fraction, rel=1e-12)
        assert by_key[row.key].delta_norm == pytest.approx(row.delta_norm, rel=1e-12)
