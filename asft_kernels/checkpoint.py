"""Streaming checkpoint reader: one tensor at a time from a model on disk or in memory.

:func:`open_checkpoint` accepts

* a local directory holding ``model.safetensors.index.json`` (sharded safetensors),
  ``model.safetensors``, ``pytorch_model.bin.index.json`` or ``pytorch_model.bin``;
* a single ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file, or an index ``.json``;
* a hub id (``"org/name"`` or ``"org/name@revision"``) found in the local Hugging Face
  cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``); nothing is downloaded, as with
  ``HF_HUB_OFFLINE=1``;
* an ``nn.Module`` or a state dict (``{name: Tensor}``).

Shapes and dtypes come from the safetensors headers (or the mmap'd ``.bin``) without
reading tensor data, so a caller can validate two checkpoints before any work. Tensor
data is read on demand by :meth:`CheckpointReader.read`; the reader counts the tensors
it has handed out that are still alive (``live_tensors``, ``peak_live_tensors``), so a
caller can prove it never holds more than a few matrices.

Module types (``nn.Linear``, GPT-2's ``Conv1D`` stored ``in × out``, the output head,
tied parameters) come from :class:`ModelLayout`: from the module itself, or for a
checkpoint on disk from a skeleton of the model built from ``config.json`` on the
``meta`` device (no memory), falling back to the config's ``model_type`` when
transformers cannot build one.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .anchor import normalize_module_name
from .errors import AnchorFileError, AsFTError

# Model types whose transformer blocks use ``transformers.pytorch_utils.Conv1D``
# (weight stored ``in × out``); used only when no skeleton of the model can be built.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
_CONV1D_LEAF = re.compile(r"^(c_attn|c_proj|c_fc|q_attn)$")
_GPT2_KEY = re.compile(r"(^|\.)h\.\d+\.attn\.c_attn\.weight$")
# Name fragments of embeddings and output heads, for checkpoints without a known layout.
_NON_LINEAR_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "shared")
_OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output", "score", "classifier")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_SINGLE = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class ModelLayout:
    """What module types say about a model's weights, keyed by normalized module names.

    Attributes:
        model_type: ``config.model_type`` when known (``"llama"``, ``"gpt2"``, ...).
        linear: names of ``nn.Linear`` / ``Conv1D`` modules, ``None`` when unknown.
        conv1d: names of modules whose weight is stored ``in × out`` (GPT-2 ``Conv1D``).
        output_heads: names of output heads (``lm_head``), excluded by ``"all-linear"``.
        tied: parameter name → the other names of the same tied tensor
            (``lm_head.weight`` ↔ ``transformer.wte.weight``).
        conv1d_by_type: no module types known, but ``model_type`` is a GPT-2-style model:
            ``c_attn``/``c_proj``/``c_fc``/``q_attn`` weights are ``Conv1D``.
    """

    model_type: str | None = None
    linear: frozenset[str] | None = None
    conv1d: frozenset[str] = frozenset()
    output_heads: frozenset[str] = frozenset()
    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)
    conv1d_by_type: bool = False

    @classmethod
    def from_module(cls, module: nn.Module, model_type: str | None = None) -> ModelLayout:
        """Layout of an instantiated model (any device, ``meta`` included)."""
        from transformers.pytorch_utils import Conv1D

        linear, conv1d = set(), set()
        for name, mod in module.named_modules():
            if isinstance(mod, Conv1D):
                conv1d.add(normalize_module_name(name))
                linear.add(normalize_module_name(name))
            elif isinstance(mod, nn.Linear):
                linear.add(normalize_module_name(name))
        heads = set()
        get_out = getattr(module, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        if head is not None:
            heads.update(normalize_module_name(n) for n, m in module.named_modules() if m is head)
        groups: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(normalize_module_name(name) + ".weight"
                                                if name.endswith(".weight") else name)
        tied = {}
        for names in groups.values():
            if len(names) > 1:
                for n in names:
                    tied[n] = tuple(o for o in names if o != n)
        if model_type is None:
            model_type = getattr(getattr(module, "config", None), "model_type", None)
        return cls(model_type=model_type, linear=frozenset(linear), conv1d=frozenset(conv1d),
                   output_heads=frozenset(heads), tied=tied)

    def _lookup(self, names: Iterable[str], name: str) -> bool:
        """``name`` is in ``names``, exactly or by a unique suffix match on a dot boundary
        (a checkpoint saved from ``GPT2Model`` against a ``GPT2LMHeadModel`` skeleton)."""
        if name in names:
            return True
        hits = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
        return len(hits) == 1

    def is_conv1d(self, module_name: str) -> bool | None:
        """Whether the module stores its weight ``in × out``; ``None`` when unknown."""
        if self.linear is not None:
            if self._lookup(self.conv1d, module_name):
                return True
            return False if self._lookup(self.linear, module_name) else None
        if self.conv1d_by_type:
            return bool(_CONV1D_LEAF.match(module_name.rsplit(".", 1)[-1]))
        return None

    def is_linear(self, module_name: str) -> bool | None:
        """Whether the module is ``nn.Linear``/``Conv1D``; ``None`` when unknown."""
        if self.linear is None:
            return None
        return self._lookup(self.linear, module_name)

    def is_output_head(self, module_name: str) -> bool:
        """Whether the module is the output head (by type when known, else by name)."""
        if self.linear is not None:
            return self._lookup(self.output_heads, module_name)
        return module_name.rsplit(".", 1)[-1] in _OUTPUT_HEAD_NAMES


def _layout_from_config(directory: Path) -> ModelLayout:
    """Layout of the model described by ``directory/config.json``: a skeleton on the
    ``meta`` device when transformers can build one, else what ``model_type`` tells."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        return ModelLayout()
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise AnchorFileError(f"config file {str(cfg_path)!r} is not valid JSON: {exc}") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    try:
        import transformers
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
            archs = getattr(config, "architectures", None) or []
            model_cls = getattr(transformers, archs[0], None) if archs else None
            with torch.device("meta"):
                skeleton = model_cls(config) if model_cls is not None else transformers.AutoModel.from_config(config)
        finally:
            hf_logging.set_verbosity(verbosity)
        return ModelLayout.from_module(skeleton, model_type)
    except Exception:  # unknown or custom architecture: fall back to the model type
        return ModelLayout(model_type=model_type, conv1d_by_type=model_type in CONV1D_MODEL_TYPES)


class CheckpointReader:
    """Tensors of one model, read one at a time.

    Attributes:
        description: where the tensors come from (path, hub id or object), for messages.
        layout: module types of the model (:class:`ModelLayout`).
        tensors_read: number of :meth:`read` calls so far.
        bytes_read: bytes of tensor data handed out so far.
        live_tensors: tensors handed out by :meth:`read` that are still referenced.
        peak_live_tensors: the largest ``live_tensors`` seen.
    """

    def __init__(self, description: str, layout: ModelLayout):
        self.description = description
        self.layout = layout
        self.tensors_read = 0
        self.bytes_read = 0
        self.live_tensors = 0
        self.peak_live_tensors = 0

    # Subclasses implement these three.
    def keys(self) -> list[str]:
        """Names of all tensors in the checkpoint, as stored."""
        raise NotImplementedError

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        """``(shape, dtype)`` of tensor ``key`` without reading its data."""
        raise NotImplementedError

    def _load(self, key: str) -> Tensor:
        raise NotImplementedError

    def where(self, key: str) -> str:
        """The file (or object) holding tensor ``key``, for error messages."""
        return self.description

    def read(self, key: str) -> Tensor:
        """Tensor ``key`` (its stored dtype, on CPU). Counted in ``live_tensors`` until
        the caller drops every reference to it.

        Raises:
            AnchorFileError: the tensor is missing, or its file is truncated/corrupted.
        """
        tensor = self._load(key)
        self.tensors_read += 1
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.live_tensors += 1
        self.peak_live_tensors = max(self.peak_live_tensors, self.live_tensors)
        weakref.finalize(tensor, self._release)
        return tensor

    def _release(self) -> None:
        self.live_tensors -= 1

    def stats(self) -> dict[str, int]:
        """Streaming counters as plain ints (for build metadata)."""
        return {"tensors_read": self.tensors_read, "bytes_read": self.bytes_read,
                "peak_live_tensors": self.peak_live_tensors}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, {len(self.keys())} tensors)"


class SafetensorsReader(CheckpointReader):
    """One or several safetensors files; ``weight_map`` maps tensor name → file.

    Headers are read (and checked against the file sizes) when the reader is built; data
    is read with ``safetensors.safe_open`` one tensor at a time.
    """

    def __init__(self, files: list[Path], description: str, layout: ModelLayout,
                 weight_map: Mapping[str, str] | None = None):
        super().__init__(description, layout)
        from safetensors import safe_open

        self._file_of: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
        for path in files:
            if not path.is_file():
                raise AnchorFileError(f"{description}: shard {str(path)!r} does not exist")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self._info[key] = (tuple(int(d) for d in sl.get_shape()),
                                           _SAFETENSORS_DTYPES.get(sl.get_dtype()))
                        self._file_of[key] = path
            except Exception as exc:  # safetensors raises its own error types
                raise AnchorFileError(f"{str(path)!r} is not a readable safetensors file "
                                      f"(truncated or corrupted?): {exc}") from exc
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self._info or self._file_of[key].name != Path(fname).name:
                    raise AnchorFileError(f"{description}: the index lists tensor {key!r} in {fname!r}, "
                                          "which does not hold it")

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        return self._info[key]

    def where(self, key: str) -> str:
        return str(self._file_of.get(key, self.description))

    def _load(self, key: str) -> Tensor:
        from safetensors import safe_open

        if key not in self._file_of:
            raise AnchorFileError(f"{self.description}: no tensor {key!r}")
        path = self._file_of[key]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as exc:
            raise AnchorFileError(f"{str(path)!r}: cannot read tensor {key!r}: {exc}") from exc


class MappingReader(CheckpointReader):
    """A state dict in memory, an ``nn.Module``'s parameters, or mmap'd ``.bin`` files."""

    def __init__(self, tensors: Mapping[str, Tensor], description: str, layout: ModelLayout,
                 file_of: Mapping[str, str] | None = None):
        super().__init__(description, layout)
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise AsFTError(f"{description}: entries {bad[:3]} are not tensors; expected a state dict")
        self._tensors = tensors
        self._file_of = dict(file_of or {})

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        t = self._tensors[key]
        return tuple(int(d) for d in t.shape), t.dtype

    def where(self, key: str) -> str:
        return self._file_of.get(key, self.description)

    def _load(self, key: str) -> Tensor:
        if key not in self._tensors:
            raise AnchorFileError(f"{self.description}: no tensor {key!r}")
        try:
            # A fresh tensor object sharing storage, so counting it never keeps the
            # caller's parameter alive; mmap'd .bin data is paged in here.
            return self._tensors[key].detach()
        except Exception as exc:
            raise AnchorFileError(f"{self.where(key)!r}: cannot read tensor {key!r}: {exc}") from exc


def _load_bin(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise AnchorFileError(f"checkpoint file {str(path)!r} does not exist")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise AnchorFileError(f"{str(path)!r} is not a readable torch checkpoint (truncated, corrupted, "
                              f"or not saved with torch.save's zip format): {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise AnchorFileError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AnchorFileError(f"checkpoint index {str(path)!r} is malformed: {exc}") from exc
    if not isinstance(index, dict) or "weight_map" not in index:
        # another JSON file given (config.json, tokenizer.json, ...): not a broken index
        kind = "a model config" if isinstance(index, dict) and ("model_type" in index or "architectures" in index) \
            else "a JSON file"
        raise AnchorFileError(
            f"{str(path)!r} is {kind}, not a checkpoint: give the checkpoint's directory "
            f"({str(path.parent)!r}), its weights file (.safetensors, .bin) or its index (*.index.json)")
    try:
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AnchorFileError(f"checkpoint index {str(path)!r} is malformed: {exc}") from exc
    return weight_map


def _open_file(path: Path, layout: ModelLayout) -> CheckpointReader:
    name = path.name
    if name.endswith(".json"):
        weight_map = _read_index(path)
        shards = sorted({path.parent / f for f in weight_map.values()})
        if all(s.suffix == ".safetensors" for s in shards):
            return SafetensorsReader(shards, str(path), layout, weight_map)
        state: dict[str, Tensor] = {}
        file_of: dict[str, str] = {}
        for shard in shards:
            part = _load_bin(shard)
            state.update(part)
            file_of.update(dict.fromkeys(part, str(shard)))
        missing = [k for k in weight_map if k not in state]
        if missing:
            raise AnchorFileError(f"{str(path)!r}: tensors {missing[:3]} listed in the index are in no shard")
        return MappingReader(state, str(path), layout, file_of)
    if path.suffix == ".safetensors":
        return SafetensorsReader([path], str(path), layout)
    if path.suffix in (".bin", ".pt", ".pth"):
        return MappingReader(_load_bin(path), str(path), layout)
    raise AnchorFileError(f"{str(path)!r}: unknown checkpoint format (expected .safetensors, .bin or an index .json)")


def _open_directory(directory: Path) -> CheckpointReader:
    layout = _layout_from_config(directory)
    for candidate in (_SAFETENSORS_INDEX, _SAFETENSORS_SINGLE, _BIN_INDEX, _BIN_SINGLE):
        if (directory / candidate).is_file():
            return _open_file(directory / candidate, layout)
    singles = sorted(directory.glob("*.safetensors"))
    if len(singles) == 1:
        return _open_file(singles[0], layout)
    raise AnchorFileError(
        f"directory {str(directory)!r} holds no checkpoint: looked for {_SAFETENSORS_INDEX}, "
        f"{_SAFETENSORS_SINGLE}, {_BIN_INDEX}, {_BIN_SINGLE}"
    )


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, read from the environment at call time."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_from_cache(repo_id: str, revision: str | None = None) -> Path:
    """Snapshot directory of ``repo_id`` in the local hub cache (no network).

    Raises:
        AnchorFileError: the model (or its weight files) is not in the cache.
    """
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    for fname in (_SAFETENSORS_INDEX, _SAFETENSORS_SINGLE, _BIN_INDEX, _BIN_SINGLE):
        try:
            hit = try_to_load_from_cache(repo_id, fname, cache_dir=str(cache), revision=revision)
        except Exception as exc:  # invalid repo id
            raise AnchorFileError(f"{repo_id!r} is neither a local path nor a valid hub id: {exc}") from exc
        if isinstance(hit, str):
            return Path(hit).parent
    rev = f" at revision {revision!r}" if revision else ""
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    raise AnchorFileError(
        f"{_missing_path_message(repo_id)}; read as a Hugging Face hub id, its weights{rev} are not in the "
        f"local cache {str(cache)!r} either (nothing is downloaded): for a hub model fetch it first with "
        f"`{fetch}`"
    )


def _missing_path_message(text: str) -> str:
    """``'<text>' does not exist as a local path``, naming the nearest existing directory
    and close names in it (a typo in a local path is the likely cause)."""
    import difflib

    path = Path(text).expanduser()
    parent = path.parent
    while str(parent) != "." and not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    hints = []
    if str(parent) != "." and parent.is_dir() and parent != parent.parent:
        hints.append(f"{str(parent)!r} exists")
    try:
        names = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
    except OSError:
        names = []
    close = difflib.get_close_matches(path.relative_to(parent).parts[0], names, n=3, cutoff=0.75)
    if close:
        hints.append("did you mean " + " or ".join(repr(str(parent / c)) for c in close) + "?")
    return f"{text!r} does not exist as a local path" + (f" ({'; '.join(hints)})" if hints else "")


def open_checkpoint(source: Any, role: str = "checkpoint") -> CheckpointReader:
    """A :class:`CheckpointReader` over ``source`` (see the module docstring for the
    accepted kinds). Nothing but headers / metadata is read here.

    Args:
        source: directory, file, hub id (``org/name[@revision]``), ``nn.Module`` or state dict.
        role: how to call the source in messages (``"aligned"``, ``"base"``).

    Raises:
        AnchorFileError: missing, truncated or corrupted files; a hub id absent from the cache.
        AsFTError: a source of an unsupported type.
    """
    if isinstance(source, nn.Module):
        layout = ModelLayout.from_module(source)
        state = {name: t for name, t in source.state_dict(keep_vars=False).items()}
        return MappingReader(state, f"{role} model {type(source).__name__}", layout)
    if isinstance(source, Mapping):
        # No module types in a bare state dict; GPT-2's block names are distinctive enough
        # to know its Conv1D weights are stored in × out.
        gpt2_like = any(isinstance(k, str) and _GPT2_KEY.search(k) for k in source)
        return MappingReader(source, f"{role} state dict", ModelLayout(conv1d_by_type=gpt2_like))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return _open_directory(path)
        if path.is_file():
            return _open_file(path, _layout_from_config(path.parent))
        text = str(source)
        if text.startswith((".", "/", "~")) or text.partition("@")[0].count("/") > 1:
            raise AnchorFileError(f"{role} checkpoint {_missing_path_message(text)}")
        repo_id, _, revision = text.partition("@")
        return _open_directory(resolve_from_cache(repo_id, revision or None))
    raise AsFTError(f"{role}: expected a path, hub id, nn.Module or state dict, got {type(source).__name__}")
