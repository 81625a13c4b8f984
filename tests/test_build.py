"""build_anchor: streaming from real (tiny) checkpoints of four architectures, target
matching, layouts, errors, and the ``asft build-anchor`` / ``asft inspect`` commands."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import lora

import asft_kernels as asft
from asft_kernels.anchor import normalize_module_name
from asft_kernels.build import build_anchor, match_targets
from asft_kernels.checkpoint import open_checkpoint
from asft_kernels.cli import main
from asft_kernels.reference import published_projection

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
           "gpt2": ["c_attn", "c_fc"]}
SHARD = "20KB"  # forces several shards for these tiny models


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def tiny_model(arch: str, seed: int = 0, hidden: int = 32, inter: int = 48):
    """A tiny causal LM of ``arch`` (float32), built from a config."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    else:
        cfg = transformers.GPT2Config(n_embd=hidden, n_inner=inter, n_layer=2, n_head=4, vocab_size=64,
                                      n_positions=64, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    return model.eval()


def align(base, seed: int = 1, low_rank: int = 3):
    """An "aligned" copy of ``base``: every 2-D weight gets a rank-``low_rank`` update plus
    small full-rank noise, so deltas have a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    aligned = copy.deepcopy(base)
    with torch.no_grad():
        for p in aligned.parameters():
            if p.ndim == 2:
                m, n = p.shape
                L = torch.randn(m, low_rank, generator=g) @ torch.randn(low_rank, n, generator=g)
                p.add_(0.05 * L + 1e-3 * torch.randn(m, n, generator=g))
    return aligned


def true_delta(aligned, base, name: str, conv1d: bool) -> torch.Tensor:
    """``V`` (out × in, float64) straight from the two models' weights."""
    a = aligned.get_submodule(name).weight.detach().double()
    b = base.get_submodule(name).weight.detach().double()
    return (a - b).T if conv1d else a - b


@pytest.fixture(scope="module", params=ARCHS)
def ckpt(request, tmp_path_factory):
    """(arch, aligned model, base model, aligned dir, base dir), sharded safetensors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    arch = request.param
    base = tiny_model(arch)
    aligned = align(base)
    root = tmp_path_factory.mktemp(arch)
    base.save_pretrained(root / "base", max_shard_size=SHARD)
    aligned.save_pretrained(root / "aligned", max_shard_size=SHARD)
    assert len(list((root / "aligned").glob("*.safetensors"))) > 2  # really sharded
    return arch, aligned, base, root / "aligned", root / "base"


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base = tiny_model("llama")
    aligned = align(base)
    root = tmp_path_factory.mktemp("llama_single")
    base.save_pretrained(root / "base", max_shard_size=SHARD)
    aligned.save_pretrained(root / "aligned", max_shard_size=SHARD)
    return aligned, base, root


# --- correctness on four architectures ---------------------------------------------------


def test_anchor_equals_svd_of_true_deltas_and_binds(ckpt):
    arch, aligned, base, a_dir, b_dir = ckpt
    conv1d = arch == "gpt2"
    anchor = build_anchor(a_dir, b_dir, TARGETS[arch], rank=None, dtype=torch.float64, progress=False)
    expected = [n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS[arch]]
    assert sorted(anchor) == sorted(expected)
    for name in expected:
        V = true_delta(aligned, base, name, conv1d)
        e = anchor[name]
        assert e.shape == tuple(V.shape)
        torch.testing.assert_close(e.s, torch.linalg.svdvals(V)[: e.rank], rtol=1e-9, atol=1e-12)
        # U diag(s²) Uᵀ = V Vᵀ is sign-invariant: the SVD of the true delta, exactly.
        torch.testing.assert_close((e.U * e.s.square()) @ e.U.T, V @ V.T, rtol=1e-9, atol=1e-12)
        assert e.fro_norm == pytest.approx(float(torch.linalg.matrix_norm(V)), rel=1e-12)
        assert e.energy == pytest.approx(1.0, abs=1e-9)
    meta = anchor.metadata
    assert meta["per_module"][expected[0]]["conv1d"] is conv1d
    assert meta["checkpoint_dtypes"]["aligned"] == ["torch.float32"]

    # The PEFT model of the aligned checkpoint, loaded from disk: bind, and the
    # regularizer through the built anchor equals the dense published formula.
    import transformers

    from asft_kernels.reference import paper_regularizer

    loaded = transformers.AutoModelForCausalLM.from_pretrained(a_dir).double()
    peft_model = lora(loaded, r=4, targets=TARGETS[arch], **({"fan_in_fan_out": True} if conv1d else {}))
    binding = anchor.bind(peft_model, mode="paper")
    assert len(binding) == len(expected)
    lam = 0.7
    got = paper_regularizer(binding, anchor_lambda=lam)
    want = torch.zeros((), dtype=torch.float64)
    for pair in binding:
        C = published_projection(true_delta(aligned, base, pair.key, conv1d))
        BA = pair.B.detach() @ pair.A.detach()
        want = want + lam * ((torch.eye(C.shape[0], dtype=C.dtype) - C) @ BA).pow(2).sum()
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


def test_all_linear_matches_peft_resolution(ckpt):
    arch, aligned, base, a_dir, b_dir = ckpt
    anchor = build_anchor(a_dir, b_dir, "all-linear", rank=2, progress=False)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, target_modules="all-linear", fan_in_fan_out=arch == "gpt2")
    peft_model = get_peft_model(copy.deepcopy(aligned), cfg)
    peft_names = {normalize_module_name(n) for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert set(anchor) == peft_names
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in anchor)
    assert {e.rank for e in anchor.values()} == {2}
    assert len(anchor.bind(peft_model)) == len(peft_names)


def test_target_matching_rules(llama_ckpt):
    _, _, root = llama_ckpt
    reader = open_checkpoint(root / "aligned")
    names = [normalize_module_name(k) for k in reader.keys() if k.endswith(".weight") and len(reader.info(k)[0]) == 2]
    assert match_targets(names, ["q_proj"], reader) == ["model.layers.0.self_attn.q_proj",
                                                         "model.layers.1.self_attn.q_proj"]
    # exact full name, suffix on a dot boundary only ("proj" is not a suffix of "q_proj" here)
    assert match_targets(names, ["model.layers.1.mlp.up_proj"], reader) == ["model.layers.1.mlp.up_proj"]
    assert match_targets(names, ["proj"], reader) == []
    # a string is a regex that must match the whole name
    assert match_targets(names, r".*\.0\.self_attn\.(q|v)_proj", reader) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert match_targets(names, r"q_proj", reader) == []
    assert reader.stats()["tensors_read"] == 0  # matching never reads tensor data


def test_energy_picks_per_module_rank(llama_ckpt):
    aligned, base, root = llama_ckpt
    anchor = build_anchor(root / "aligned", root / "base", ["q_proj", "down_proj"], rank=None, energy=0.9,
                          dtype=torch.float64, progress=False)
    for name, e in anchor.items():
        s = torch.linalg.svdvals(true_delta(aligned, base, name, False))
        cum = torch.cumsum(s.square(), 0) / s.square().sum()
        k = int((cum < 0.9).sum()) + 1  # fewest directions reaching 90 %
        assert e.rank == k and e.energy >= 0.9
        assert e.energy == pytest.approx(float(cum[k - 1]), rel=1e-9)
        assert anchor.metadata["per_module"][name]["energy"] == pytest.approx(e.energy)


def test_randomized_svd_recovers_low_rank_deltas(tmp_path):
    base = tiny_model("llama", hidden=128, inter=160)
    aligned = align(base, low_rank=3)
    # remove the full-rank noise: deltas of exact rank 3, where the randomized SVD is exact
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for (_, pa), (_, pb) in zip(aligned.named_parameters(), base.named_parameters()):
            if pa.ndim == 2:
                pa.copy_(pb + torch.randn(pa.shape[0], 3, generator=g) @ torch.randn(3, pa.shape[1], generator=g))
    anchor = build_anchor(aligned, base, ["v_proj", "gate_proj"], rank=3, progress=False)
    assert all(m["method"] == "randomized" for m in anchor.metadata["per_module"].values())
    for name, e in anchor.items():
        V = true_delta(aligned, base, name, False)
        torch.testing.assert_close((e.U.double() * e.s.double().square()) @ e.U.double().T, V @ V.T,
                                   rtol=1e-4, atol=1e-3 * float(V.norm()) ** 2 / V.shape[0])
        assert e.energy == pytest.approx(1.0, abs=1e-5)


# --- sources, dtypes, layouts ------------------------------------------------------------


def test_every_source_kind_gives_the_same_anchor(llama_ckpt, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    aligned, base, root = llama_ckpt
    targets = ["k_proj", "up_proj"]
    ref = build_anchor(root / "aligned", root / "base", targets, rank=None, dtype=torch.float64, progress=False)
    # single safetensors file, .bin (torch.save zip format, read with mmap), state dict, module
    save_file({k: v.contiguous() for k, v in aligned.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "aligned.safetensors"))
    torch.save(base.state_dict(), tmp_path / "pytorch_model.bin")
    # a hub id found in a local cache laid out as huggingface_hub writes it
    snap = tmp_path / "hub" / "models--org--tiny-base" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--org--tiny-base" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-base" / "refs" / "main").write_text("0" * 40)
    for f in (root / "base").iterdir():
        os.symlink(f, snap / f.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for a_src, b_src in [(tmp_path / "aligned.safetensors", tmp_path / "pytorch_model.bin"),
                         (aligned.state_dict(), base), (aligned, "org/tiny-base")]:
        anchor = build_anchor(a_src, b_src, targets, rank=None, dtype=torch.float64, progress=False)
        assert sorted(anchor) == sorted(ref)
        for name in ref:
            torch.testing.assert_close(anchor[name].s, ref[name].s, rtol=1e-12, atol=1e-12)


def test_hub_id_absent_from_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(asft.AnchorFileError, match="not in the local cache") as info:
        build_anchor("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf", ["q_proj"], progress=False)
    assert "`hf download meta-llama/Llama-2-7b-chat-hf`" in str(info.value)
    assert "huggingface-cli" not in str(info.value)


def test_typo_in_a_local_path_says_the_path_does_not_exist_first(llama_ckpt, tmp_path, monkeypatch):
    _, _, root = llama_ckpt
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(root)
    with pytest.raises(asft.AnchorFileError) as info:
        build_anchor("aligned/x", "base", ["q_proj"], progress=False)  # one slash: could be a hub id
    message = str(info.value)
    assert message.startswith("'aligned/x' does not exist as a local path ('aligned' exists")
    assert "huggingface-cli" not in message
    with pytest.raises(asft.AnchorFileError, match=r"'alinged' does not exist as a local path \(did you mean "
                                                   r"'aligned'\?\)"):
        build_anchor("alinged", "base", ["q_proj"], progress=False)


def test_bf16_and_fp16_checkpoints_are_upcast_before_subtracting(tmp_path):
    base = tiny_model("qwen2")
    aligned = align(base)
    aligned.to(torch.bfloat16).save_pretrained(tmp_path / "a", max_shard_size=SHARD)
    base.to(torch.float16).save_pretrained(tmp_path / "b", max_shard_size=SHARD)
    anchor = build_anchor(tmp_path / "a", tmp_path / "b", ["o_proj"], rank=None, dtype=torch.float64,
                          progress=False)
    assert anchor.metadata["checkpoint_dtypes"] == {"aligned": ["torch.bfloat16"], "base": ["torch.float16"]}
    for name, e in anchor.items():
        V = aligned.get_submodule(name).weight.double() - base.get_submodule(name).weight.double()
        torch.testing.assert_close((e.U * e.s.square()) @ e.U.T, V @ V.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ckpt", ["gpt2"], indirect=True)
def test_gpt2_tied_head_is_read_through_the_embedding(ckpt):
    arch, aligned, base, a_dir, b_dir = ckpt
    anchor = build_anchor(a_dir, b_dir, ["lm_head"], rank=None, dtype=torch.float64, progress=False)
    assert list(anchor) == ["lm_head"]
    assert anchor.metadata["per_module"]["lm_head"]["keys"] == ["transformer.wte.weight"] * 2
    V = aligned.lm_head.weight.double() - base.lm_head.weight.double()  # (vocab, hidden), out × in
    e = anchor["lm_head"]
    assert e.shape == tuple(V.shape)
    torch.testing.assert_close((e.U * e.s.square()) @ e.U.T, V @ V.T, rtol=1e-9, atol=1e-12)


# --- streaming -----------------------------------------------------------------------------


def test_streaming_reader_holds_one_tensor_at_a_time(ckpt):
    arch, _, _, a_dir, b_dir = ckpt
    anchor = build_anchor(a_dir, b_dir, "all-linear", rank=4, progress=False)
    for side in ("aligned", "base"):
        stats = anchor.metadata["streaming"][side]
        assert stats["tensors_read"] == len(anchor)  # each target read once, nothing else
        assert stats["peak_live_tensors"] == 1


def test_reader_counts_live_tensors(llama_ckpt):
    _, _, root = llama_ckpt
    reader = open_checkpoint(root / "aligned")
    keys = [k for k in reader.keys() if k.endswith("proj.weight")][:3]
    held = [reader.read(k) for k in keys]
    assert reader.live_tensors == 3
    del held
    assert reader.live_tensors == 0 and reader.peak_live_tensors == 3 and reader.tensors_read == 3


# --- mismatches and bad files --------------------------------------------------------------


def test_shape_mismatch_names_module_and_shapes_before_any_read(llama_ckpt, tmp_path, monkeypatch):
    import asft_kernels.build as build_mod

    _, _, root = llama_ckpt
    other = tiny_model("llama", inter=40)
    other.save_pretrained(tmp_path / "other", max_shard_size=SHARD)
    calls = []
    monkeypatch.setattr(build_mod, "_factorize", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(build_mod, "_read_delta", lambda *a, **k: calls.append(a))
    with pytest.raises(asft.AnchorMismatchError, match=r"model\.layers\.0\.mlp\.up_proj.*\(48, 32\).*\(40, 32\)"):
        build_anchor(root / "aligned", tmp_path / "other", ["q_proj", "up_proj"], progress=False)
    assert calls == []  # nothing read, no SVD


@pytest.mark.parametrize("ckpt", ["gpt2"], indirect=True)
def test_missing_targets_and_other_architectures(llama_ckpt, ckpt):
    aligned, base, root = llama_ckpt
    with pytest.raises(asft.AnchorMismatchError, match="match no 2-D weight"):
        build_anchor(root / "aligned", root / "base", ["nonexistent_proj"], progress=False)
    sd = {k: v for k, v in base.state_dict().items() if k != "model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(asft.AnchorMismatchError, match=r"model\.layers\.1\.self_attn\.v_proj.*missing from base"):
        build_anchor(root / "aligned", sd, ["v_proj"], progress=False)
    with pytest.raises(asft.AnchorMismatchError, match="not a linear"):
        build_anchor(aligned, base, ["embed_tokens"], progress=False)
    _, _, _, gpt2_dir, _ = ckpt
    with pytest.raises(asft.AnchorMismatchError, match="different architectures.*'llama'.*'gpt2'"):
        build_anchor(root / "aligned", gpt2_dir, "all-linear", progress=False)


def _copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_and_truncated_files_give_file_errors(llama_ckpt, tmp_path):
    _, _, root = llama_ckpt
    index = json.loads((root / "aligned" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]

    trunc = _copy_dir(root / "aligned", tmp_path / "trunc")
    data = (trunc / shard).read_bytes()
    (trunc / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(asft.AnchorFileError, match="truncated or corrupted"):
        build_anchor(trunc, root / "base", ["q_proj"], progress=False)

    garbage = _copy_dir(root / "aligned", tmp_path / "garbage")
    (garbage / shard).write_bytes(b"\xff" * 64)
    with pytest.raises(asft.AnchorFileError, match=shard):
        build_anchor(garbage, root / "base", ["q_proj"], progress=False)

    missing = _copy_dir(root / "aligned", tmp_path / "missing")
    (missing / shard).unlink()
    with pytest.raises(asft.AnchorFileError, match="does not exist"):
        build_anchor(missing, root / "base", ["q_proj"], progress=False)

    bad_index = _copy_dir(root / "aligned", tmp_path / "bad_index")
    (bad_index / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(asft.AnchorFileError, match="malformed"):
        build_anchor(bad_index, root / "base", ["q_proj"], progress=False)

    (tmp_path / "broken.bin").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(asft.AnchorFileError, match="broken.bin"):
        build_anchor(tmp_path / "broken.bin", root / "base", ["q_proj"], progress=False)

    # NaN inside a well-formed shard: named by file and tensor
    from safetensors.torch import load_file, save_file

    nan_dir = _copy_dir(root / "aligned", tmp_path / "nan")
    tensors = load_file(str(nan_dir / shard))
    tensors["model.layers.0.self_attn.q_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(nan_dir / shard), metadata={"format": "pt"})
    with pytest.raises(asft.AnchorFileError, match=r"q_proj\.weight.*NaN"):
        build_anchor(nan_dir, root / "base", ["q_proj"], progress=False)


# --- command line ------------------------------------------------------------------------------


def test_cli_build_inspect_and_plot(llama_ckpt, tmp_path, capsys):
    _, _, root = llama_ckpt
    out = tmp_path / "anchor.safetensors"
    rc = main(["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"),
               "--targets", "q_proj,v_proj", "--rank", "3", "--out", str(out), "--no-progress"])
    assert rc == 0 and out.is_file()
    anchor = asft.AlignmentAnchor.load(out)
    assert len(anchor) == 4 and {e.rank for e in anchor.values()} == {3}
    assert anchor.metadata["built_by"] == "build_anchor" and anchor.metadata["rank"] == 3
    ref = build_anchor(root / "aligned", root / "base", ["q_proj", "v_proj"], rank=3, progress=False)
    for name in ref:
        torch.testing.assert_close(anchor[name].s, ref[name].s)
    capsys.readouterr()

    png = tmp_path / "spectrum.png"
    assert main(["inspect", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    for name, e in anchor.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        assert f"{e.shape[0]}x{e.shape[1]}" in line and f"{e.energy:.4f}" in line
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_failure_leaves_no_output_file(llama_ckpt, tmp_path, capsys):
    _, _, root = llama_ckpt
    trunc = _copy_dir(root / "aligned", tmp_path / "trunc")
    shard = sorted(trunc.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    out = tmp_path / "out" / "anchor.safetensors"
    rc = main(["build-anchor", "--aligned", str(trunc), "--base", str(root / "base"), "--targets", "all-linear",
               "--rank", "2", "--out", str(out), "--no-progress"])
    assert rc == 1
    assert "error" in capsys.readouterr().err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    # an existing anchor is left untouched by a failed rebuild
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"previous")
    rc = main(["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"),
               "--targets", "nonexistent", "--out", str(out), "--no-progress"])
    assert rc == 1 and out.read_bytes() == b"previous" and len(list(out.parent.iterdir())) == 1


@pytest.mark.parametrize("ckpt", ["gpt2"], indirect=True)
def test_gpt2_state_dicts_and_sharded_bin_give_the_directory_anchor(ckpt, tmp_path):
    _, aligned, base, a_dir, b_dir = ckpt
    ref = build_anchor(a_dir, b_dir, "all-linear", rank=None, dtype=torch.float64, progress=False)
    # bare state dicts: no module types, GPT-2 Conv1D recognised by its block names
    from_sd = build_anchor(aligned.state_dict(), base.state_dict(), "all-linear", rank=None,
                           dtype=torch.float64, progress=False)
    # sharded .bin with pytorch_model.bin.index.json
    sd = base.state_dict()
    keys = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for fname, part in shards.items():
        torch.save({k: sd[k] for k in part}, tmp_path / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    from_bin = build_anchor(a_dir, tmp_path, "all-linear", rank=None, dtype=torch.float64, progress=False)
    for anchor in (from_sd, from_bin):
        assert sorted(anchor) == sorted(ref)
        for name in ref:
            assert anchor[name].shape == ref[name].shape
            torch.testing.assert_close(anchor[name].s, ref[name].s, rtol=1e-12, atol=1e-12)


# --- typo'd targets, unchanged modules, reproducible files ---------------------------------------


def test_typo_in_a_target_is_refused_listing_module_names(llama_ckpt, tmp_path, capsys):
    aligned, base, root = llama_ckpt
    with pytest.raises(asft.AnchorMismatchError, match=r"\['q_prj'\].*q_proj.*v_proj.*allow_missing_targets") as e:
        build_anchor(root / "aligned", root / "base", ["q_prj", "v_proj"], progress=False)
    assert "up_proj" in str(e.value)  # the names that exist
    anchor = build_anchor(aligned, base, ["q_prj", "v_proj"], allow_missing_targets=True, progress=False)
    assert sorted(anchor) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    out = tmp_path / "a.safetensors"
    argv = ["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--targets",
            "q_prj,v_proj", "--rank", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 1 and not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "q_prj" in err and "--allow-missing-targets" in err
    assert main(argv + ["--allow-missing-targets"]) == 0 and len(asft.AlignmentAnchor.load(out)) == 2


def test_unchanged_modules_are_refused_unless_skipped(llama_ckpt, tmp_path, capsys):
    aligned, base, root = llama_ckpt
    with pytest.raises(asft.AnchorMismatchError, match=r"unchanged.*skip_unchanged=True") as info:
        build_anchor(root / "base", root / "base", ["q_proj", "v_proj"], progress=False)
    assert all(f"model.layers.{i}.self_attn.{t}" in str(info.value) for i in (0, 1) for t in ("q_proj", "v_proj"))
    # only q_proj changed: v_proj is named, and left out on request
    half = {k: (aligned.state_dict()[k] if "q_proj" in k else v) for k, v in base.state_dict().items()}
    with pytest.raises(asft.AnchorMismatchError, match=r"2 module\(s\) unchanged") as info:
        build_anchor(half, base, ["q_proj", "v_proj"], progress=False)
    assert "v_proj" in str(info.value) and "q_proj" not in str(info.value)
    anchor = build_anchor(half, base, ["q_proj", "v_proj"], skip_unchanged=True, progress=False)
    assert sorted(anchor) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert anchor.metadata["skipped_unchanged"] == ["model.layers.0.self_attn.v_proj",
                                                    "model.layers.1.self_attn.v_proj"]
    out = tmp_path / "a.safetensors"
    argv = ["build-anchor", "--aligned", str(root / "base"), "--base", str(root / "base"), "--targets", "q_proj",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 1 and not out.exists()
    assert "--skip-unchanged" in capsys.readouterr().err


def test_two_builds_give_byte_identical_files(llama_ckpt, tmp_path):
    _, _, root = llama_ckpt
    files = []
    for i, seed in enumerate((None, None, 5)):
        out = tmp_path / f"{i}.safetensors"
        argv = ["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--targets",
                "all-linear", "--rank", "2", "--method", "randomized", "--out", str(out), "--no-progress"]
        assert main(argv + (["--seed", str(seed)] if seed is not None else [])) == 0
        files.append(out.read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]
    meta = asft.AlignmentAnchor.load(tmp_path / "2.safetensors").metadata
    assert meta["seed"] == 5 and meta["method"] == "randomized"
    assert {m["method"] for m in meta["per_module"].values()} == {"randomized"}
    assert asft.AlignmentAnchor.load(tmp_path / "0.safetensors").metadata["seed"] == 0


# --- command-line errors: one line on stderr, exit 1 (2 for usage errors) ----------------------------


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("asft "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_cli_ordinary_mistakes_print_one_line_and_exit_1(llama_ckpt, tmp_path, capsys):
    _, _, root = llama_ckpt
    build = ["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--targets",
             "q_proj", "--rank", "2", "--no-progress"]
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    assert main(build + ["--out", str(tmp_path / "dir.safetensors")]) == 1
    _one_line_error(capsys, "is a directory")
    assert main(build + ["--out", str(a_file / "sub" / "a.safetensors")]) == 1
    _one_line_error(capsys, "not a directory")
    if not torch.cuda.is_available():
        assert main(build + ["--device", "cuda", "--out", str(tmp_path / "a.safetensors")]) == 1
        _one_line_error(capsys, "'cuda' is not available")
    good = tmp_path / "good.safetensors"
    assert main(build + ["--out", str(good)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(good), "--plot", str(a_file / "x.png")]) == 1
    _one_line_error(capsys, "--plot")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import load_file, save_file

    save_file(load_file(good), str(bad), metadata={"asft_anchor": json.dumps({"format_version": 1, "modules": []})})
    assert main(["inspect", str(bad)]) == 1
    _one_line_error(capsys, "bad.safetensors", "'modules'")


@pytest.mark.parametrize("option", [["--device", "bogus"], ["--oversample", "-5"], ["--niter", "-1"],
                                    ["--seed", "-3"], ["--rank", "0"], ["--energy", "2"], ["--targets", ","]],
                         ids=["device-bogus", "oversample-negative", "niter-negative", "seed-negative", "rank-zero",
                              "energy-above-one", "targets-empty"])
def test_cli_usage_errors_exit_2(llama_ckpt, tmp_path, capsys, option):
    _, _, root = llama_ckpt
    argv = ["build-anchor", "--aligned", str(root / "aligned"), "--base", str(root / "base"), "--rank", "2",
            "--out", str(tmp_path / "a.safetensors"), "--no-progress"]
    if option[0] != "--targets":
        argv += ["--targets", "q_proj"]
    with pytest.raises(SystemExit) as info:
        main(argv + option)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and option[0] in err
    assert not (tmp_path / "a.safetensors").exists()


def test_cli_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exit status" in out and "1  error" in out and "2  usage error" in out
