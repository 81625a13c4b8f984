"""What the ``asft`` commands say: help text, error lines, output paths, and notes on what
they did with an option (docs: README's command-line paragraph, ``asft --help``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from asft_kernels.cli import _one_line, main
from asft_kernels.demo import analysis
from asft_kernels.errors import AsFTError


@pytest.fixture()
def tiny_ckpt(tmp_path):
    """Two single-file checkpoints of one 8 × 6 module (no config.json: layers by name)."""
    g = torch.Generator().manual_seed(0)
    for side in ("aligned", "base"):
        d = tmp_path / side
        d.mkdir()
        save_file({"model.layers.0.q_proj.weight": torch.randn(8, 6, generator=g)}, d / "model.safetensors")
    return tmp_path


def _build(root, out, *extra):
    return main(["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--targets",
                 "q_proj", "--out", str(out), "--no-progress", *extra])


def test_demo_help_shows_percent_signs_once_and_the_decision_rule(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "%%" not in out and "10% harmful" in out
    # the verdict's rule is in the installed package, not only in docs/ of the source tree
    assert all(label in out for label in analysis.LABELS)
    assert "-".join(analysis.POSITIVE_PAIR).replace("-", " - ") in out


@pytest.mark.parametrize("argv", [["--seeds", "1", "1"], ["--jobs", "0"], ["--threads", "0"]])
def test_demo_errors_name_the_command_once(tmp_path, capsys, argv):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("asft demo: error: ") and err.count("asft demo") == 1, err


def test_an_error_message_carrying_the_prefix_is_printed_with_it_once():
    # DemoConfig.validate and run_demo word their errors "asft demo: ..." for API callers
    assert _one_line(AsFTError("asft demo: jobs must be >= 1, got 0"), "demo") == "jobs must be >= 1, got 0"
    assert _one_line(AsFTError("asft demo: x"), "inspect") == "asft demo: x"


def test_os_errors_are_worded_without_errno_numbers():
    assert _one_line(PermissionError(13, "Permission denied", "/x/y")) == "'/x/y': Permission denied"
    assert _one_line(FileNotFoundError(2, "No such file or directory", "/a")) == "'/a': No such file or directory"


def test_out_below_a_file_is_worded_alike_by_demo_and_build_anchor(tiny_ckpt, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "sub"), "--quick"]) == 1
    demo_err = capsys.readouterr().err
    assert _build(tiny_ckpt, blocker / "sub" / "x.safetensors") == 1
    build_err = capsys.readouterr().err
    for err, out in ((demo_err, blocker / "sub"), (build_err, blocker / "sub" / "x.safetensors")):
        assert f"--out {str(out)!r}: {str(blocker)!r} is not a directory" in err, err
        assert "Errno" not in err
    assert main(["demo", "--out", str(blocker), "--quick"]) == 1
    assert f"--out {str(blocker)!r} is a file; give a folder" in capsys.readouterr().err


def test_check_output_dir_accepts_missing_folders_under_a_writable_one(tmp_path):
    from asft_kernels.cli import check_output_dir

    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # created when the results are written, not by the check


def test_every_command_creates_missing_parent_folders_of_its_outputs(tiny_ckpt, tmp_path, monkeypatch, capsys):
    anchor = tmp_path / "new" / "deeper" / "anchor.safetensors"
    assert _build(tiny_ckpt, anchor) == 0 and anchor.is_file()
    plot = tmp_path / "plots" / "of" / "spectrum.png"
    assert main(["inspect", str(anchor), "--plot", str(plot)]) == 0 and plot.is_file()
    from asft_kernels.demo.experiment import DemoConfig

    monkeypatch.setattr(DemoConfig, "quick_config", classmethod(lambda cls, seeds=(0,): cls.smoke_config(seeds)))
    folder = tmp_path / "demo" / "runs" / "one"
    capsys.readouterr()
    assert main(["demo", "--out", str(folder), "--quick", "--no-progress", "--jobs", "1"]) == 0
    assert (folder / "results.json").is_file()
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    # the verdict points at what an installed wheel has
    assert "docs/" not in verdict and "asft demo --help" in verdict


def test_a_rank_above_what_a_module_has_is_reported(tiny_ckpt, tmp_path, capsys):
    assert _build(tiny_ckpt, tmp_path / "a.safetensors", "--rank", "999") == 0
    out = capsys.readouterr().out
    assert "--rank 999 is more than 1 module(s) have" in out and "keep all 6 directions" in out, out
    assert _build(tiny_ckpt, tmp_path / "b.safetensors", "--rank", "4") == 0
    assert "is more than" not in capsys.readouterr().out


def test_a_config_json_given_as_checkpoint_is_named_for_what_it_is(tiny_ckpt, tmp_path, capsys):
    root = tiny_ckpt
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (root / "aligned" / "config.json").write_text(json.dumps(config))
    rc = main(["build-anchor", "--aligned", str(root / "aligned" / "config.json"), "--base", str(root / "base"),
               "--targets", "q_proj", "--out", str(tmp_path / "x.safetensors"), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "is a model config, not a checkpoint" in err and str(root / "aligned") in err
    assert "malformed" not in err
