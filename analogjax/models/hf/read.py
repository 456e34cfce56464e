"""Import: a Hugging Face folder's safetensors weights, read tensor by tensor onto the mesh.

Each device's shard is cut out of the safetensors files with `get_slice`, so no host ever holds a whole model (a
stacked [layers, ...] shard reads only the layers it covers). The tensor table (tensors.py) says where each of our
params lives in the HF files; other file formats (GGUF) hand `params_from_tensors` their own tensor source. A tensor
stored as MXFP4 blocks and scales (gpt-oss's experts) reads as its dequantized self (mxfp4.py), slice by slice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safetensors can hand out bf16 slices
import numpy as np

from analogjax.errors import UserError
from analogjax.models.config import ModelConfig
from analogjax.models.hf import mxfp4
from analogjax.models.hf.convert import CONFIG_FILE, model_config_from_hf, read_json, tensor_prefix
from analogjax.models.hf.tensors import (
    INDEX_FILE,
    WEIGHTS_FILE,
    TensorMap,
    get_param,
    rotate_half_order,
    set_param,
    tensor_maps,
)
from analogjax.models.model import Model
from analogjax.runtime import storage


class _SafetensorFiles:
    """Which file holds which tensor (single file or a sharded index), with open handles kept per file."""

    def __init__(self, folder: Path, prefix: str = ""):
        self.folder = folder
        self.prefix = prefix  # before every name (a multimodal folder's text model: convert.tensor_prefix)
        self._handles: dict[Path, Any] = {}
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            self.where: dict[str, Path] = {name: folder / file for name, file in weight_map.items()}
        elif (folder / WEIGHTS_FILE).is_file():
            single = folder / WEIGHTS_FILE
            self.where = {name: single for name in self._open(single).keys()}
        else:
            raise UserError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are read)")
        for file in set(self.where.values()):
            if not file.is_file():
                raise UserError(f"{folder}: {INDEX_FILE} names {file.name}, which is missing")

    def _open(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(file), framework="np")
            except Exception as exc:  # the Rust reader raises plain exceptions for corrupt headers
                raise UserError(f"{file}: not a readable safetensors file ({exc})") from None
        return self._handles[file]

    def slice(self, name: str):
        return self._slice(self.prefix + name)

    def _slice(self, name: str):  # `name` as the files spell it (prefix included)
        if name not in self.where:
            quantized = (name + "_blocks", name + "_scales")
            if all(part in self.where for part in quantized):
                try:
                    return mxfp4.QuantizedSlice(name, *(self._slice(part) for part in quantized))
                except UserError as exc:
                    raise UserError(f"{self.folder}: {exc}") from None
            raise UserError(f"{self.folder}: tensor {name} is missing from the safetensors files")
        return self._open(self.where[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slice(name).get_shape())


def _read_block(tensor_slice, tmap: TensorMap, ours_index: tuple[slice, ...]) -> np.ndarray:
    """The block of one layer's HF tensor that lands at `ours_index` (slices of our per-layer array), as float32."""
    split_index: list[slice] = [slice(None)] * len(tmap.split_shape)
    for ours_dim, split_dim in enumerate(tmap.perm):
        split_index[split_dim] = ours_index[ours_dim]
    read, after = [], []  # slices on the HF tensor; then slices on each group's factors once reshaped
    pos = 0
    lanes = tmap.interleave or 1  # an interleaved last dim holds `lanes` values per one of ours
    for g, group in enumerate(tmap.groups):
        parts = [split_index[pos + j].indices(n) for j, n in enumerate(group)]
        inner = math.prod(group[1:])
        # A contiguous range of the group's leading factor; trailing factors are cut after reshaping (they are
        # head_dim in practice, never sharded, so nothing is read twice).
        offset = tmap.row_offset if g == tmap.fused_axis else 0  # a fused tensor's range starts further along
        read.append(slice(offset + parts[0][0] * inner, offset + parts[0][1] * inner))
        after.append([slice(None)] + [slice(a, b) for a, b, _ in parts[1:]])
        pos += len(group)
    on_file = read[:-1] + [slice(read[-1].start * lanes, read[-1].stop * lanes)]
    block = np.asarray(tensor_slice[tuple(on_file)])
    if tmap.interleave:
        block = block[..., tmap.lane :: lanes]
    shape = []
    for group, r in zip(tmap.groups, read):
        shape += [(r.stop - r.start) // math.prod(group[1:]), *group[1:]]
    block = block.reshape(shape)[tuple(s for sl in after for s in sl)]
    block = np.transpose(block, tmap.perm)
    if tmap.interleaved:  # head_dim is never sharded: the whole last dim is here to reorder
        block = block[..., rotate_half_order(block.shape[-1])]
    return block.astype(np.float32)


def load_params(path: str | Path, model_cfg: ModelConfig, mesh, rules) -> dict:
    """A HF folder's weights as analogjax params ({"params": ...}), each array born sharded under `rules`. A folder on
    a bucket is read from a copy in the local cache (safetensors maps local files)."""
    path = Path(storage.local_copy(path))
    if not path.is_dir():
        raise UserError(f"teacher.hf_path: Hugging Face model folder not found: {path}")
    config = path / CONFIG_FILE
    prefix = tensor_prefix(read_json(config)) if config.is_file() else ""
    return params_from_tensors(_SafetensorFiles(path, prefix), model_cfg, mesh, rules, f"{path}: config.json")


def params_from_tensors(files, model_cfg: ModelConfig, mesh, rules, source: str) -> dict:
    """Params ({"params": ...}) born sharded from `files`: anything with `shape(hf_name)` and `slice(hf_name)`
    (an object indexable like a numpy array in the HF layout). `source` names where the shapes come from."""
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import Transformer

    abstract = mesh_lib.abstract_sharded(Transformer(model_cfg).init_boxed, mesh, rules)["params"]
    params: dict = {}
    for tmap in tensor_maps(model_cfg):
        target = get_param(abstract, tmap.ours)
        names = tmap.names(model_cfg.n_layers)
        for name in np.asarray(names).reshape(-1) if tmap.experts else names:
            found = files.shape(name)
            if found != tmap.file_shape:
                raise UserError(
                    f"{source}: tensor {name} has shape {list(found)}, but the config implies {list(tmap.file_shape)}"
                )
        set_param(params, tmap.ours, _sharded_array(files, tmap, names, target))
    return {"params": params}


def _sharded_array(files: _SafetensorFiles, tmap: TensorMap, names: list[str], target) -> jax.Array:
    cache: dict[tuple, np.ndarray] = {}  # replicas of one shard on several local devices are read once

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, target.shape))
        if key not in cache:
            if tmap.experts:  # [layers, experts, ...]: this device's layers and experts only
                layers = range(*index[0].indices(target.shape[0]))
                experts = range(*index[1].indices(target.shape[1]))
                cache[key] = np.stack(
                    [
                        np.stack([_read_block(files.slice(names[i][j]), tmap, index[2:]) for j in experts])
                        for i in layers
                    ]
                )
            elif tmap.stacked:
                layers = range(*index[0].indices(target.shape[0]))
                cache[key] = np.stack([_read_block(files.slice(names[i]), tmap, index[1:]) for i in layers])
            else:
                cache[key] = _read_block(files.slice(names[0]), tmap, index)
        return cache[key]

    return jax.make_array_from_callback(target.shape, target.sharding, read)


class HFModel(Model):
    """A HF checkpoint as a callable: int32 tokens [b, s] → float32 logits [b, s, v]; params live on `mesh`."""

    def __init__(self, path: str | Path, *, mesh=None, rules=None):
        from analogjax import mesh as mesh_lib

        config = self.read_config(path)
        mesh = mesh if mesh is not None else mesh_lib.make_mesh(-1, 1, 1)
        rules = tuple(rules if rules is not None else mesh_lib.TEACHER_RULES)
        super().__init__(
            config,
            self.read_params(path, config, mesh, rules),
            mesh=mesh,
            rules=rules,
            tokenizer=self.read_tokenizer(path),
        )

    # Where the config, weights and tokenizer come from; other file formats (GGUF) override these.
    read_config = staticmethod(model_config_from_hf)
    read_params = staticmethod(load_params)

    @staticmethod
    def read_tokenizer(path) -> str | None:
        if storage.is_remote(path):  # tokenizers reads local files: a copy in the local cache
            remote = storage.location(path) / "tokenizer.json"
            return storage.local_copy(remote) if remote.is_file() else None
        file = Path(path) / "tokenizer.json"
        return str(file) if file.is_file() else None


def load(path: str | Path, *, mesh=None, rules=None) -> HFModel:
    """`analogjax.hf.load(path)(tokens) -> logits`."""
    return HFModel(path, mesh=mesh, rules=rules)
