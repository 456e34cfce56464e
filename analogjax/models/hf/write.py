"""Export: analogjax params (or a `Model`) as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained`
loads with no custom code: model.safetensors in the HF layout (tensors.py), config.json (convert.py), tokenizer
files. Every process gathers; process 0 writes. Also the output-folder checks the export commands share, and the
fingerprint a release records of the folders it came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from analogjax.data.tokenizer_files import write_tokenizer
from analogjax.errors import UserError
from analogjax.models.config import ModelConfig
from analogjax.models.hf.convert import CONFIG_FILE, architecture_for, hf_config
from analogjax.models.hf.tensors import WEIGHTS_FILE, get_param, tensor_maps
from analogjax.models.model import Model


def _host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """Refuse a non-empty output folder unless forced: checked before any work is done."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; choose another --out or pass --force")
    return out


def prepare_out_dir(out_dir: str | Path, force: bool) -> Path:
    """An empty output folder (a forced non-empty one is emptied first)."""
    out = check_out_dir(out_dir, force)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(
    model: Model,
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    force: bool = False,
    dtype: str = "float32",
    max_positions: int = 4096,
) -> Path:
    """Write a `Model` (what `load` returns, or a run's `result["student"]`) as a HF folder; its own tokenizer is
    written unless `tokenizer` names another. `save_params` is the same from a params tree and a ModelConfig."""
    if not isinstance(model, Model):
        raise UserError(
            f"hf.save takes a Model (hf.load's result or a run's student), got {type(model).__name__}; "
            "use hf.save_params(params, model_config, out_dir) for a bare params tree"
        )
    return save_params(
        model.params,
        model.config,
        out_dir,
        tokenizer=tokenizer or model.tokenizer,
        force=force,
        dtype=dtype,
        max_positions=max_positions,
    )


def save_params(
    params,
    model_cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer: str | None = None,
    *,
    force: bool = False,
    dtype: str = "float32",
    max_positions: int = 4096,
) -> Path:
    """Write `params` as a HF folder: model.safetensors, config.json and (for a tokenizer spec) tokenizer files.

    `tokenizer`: a data.tokenizer value (a HF tokenizers .json or "bytes"); None or "none" writes no tokenizer.
    Every process gathers; process 0 writes.
    """
    from safetensors.numpy import save_file

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"export dtype must be float32 or bfloat16, got {dtype!r}")
    check_out_dir(out_dir, force)
    tree = params["params"] if "params" in params else params
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    architecture_for(model_cfg)  # refuses, before any work, a model no HF architecture expresses exactly
    tensors: dict[str, np.ndarray] = {}
    row_ranges: dict[str, list[tuple[int, np.ndarray]]] = {}  # fused tensors, assembled from their row ranges
    fused_axis: dict[str, int] = {}
    lanes: dict[str, dict[int, np.ndarray]] = {}  # interleaved tensors (gpt-oss's gate_up_proj), by lane
    for tmap in tensor_maps(model_cfg):
        try:
            value = _host(get_param(tree, tmap.ours))
        except KeyError:
            raise UserError(f"params have no {'/'.join(tmap.ours)} but the model config needs it") from None
        expected = tmap.stack_shape(model_cfg.n_layers) + tuple(tmap.split_shape[p] for p in tmap.perm)
        if value.shape != expected:
            raise UserError(
                f"params {'/'.join(tmap.ours)} has shape {list(value.shape)}, the model config implies {list(expected)}"
            )
        layers = list(value) if tmap.stacked else [value]
        names = tmap.names(model_cfg.n_layers)
        if tmap.experts:  # one HF tensor per (layer, expert)
            names = [name for per_layer in names for name in per_layer]
            layers = [expert for layer in layers for expert in layer]
        for name, layer in zip(names, layers):
            if tmap.interleave:
                lanes.setdefault(name, {})[tmap.lane] = tmap.to_hf(layer)
            elif tmap.fused_rows:
                row_ranges.setdefault(name, []).append((tmap.row_offset, tmap.to_hf(layer)))
                fused_axis[name] = tmap.fused_axis
            else:
                tensors[name] = np.ascontiguousarray(tmap.to_hf(layer).astype(np_dtype))
    for name, parts in row_ranges.items():
        tensors[name] = np.ascontiguousarray(
            np.concatenate([p for _, p in sorted(parts, key=lambda x: x[0])], axis=fused_axis[name]).astype(np_dtype)
        )
    for name, by_lane in lanes.items():
        stacked = np.stack([by_lane[lane] for lane in sorted(by_lane)], axis=-1)  # [..., n, lanes]
        tensors[name] = np.ascontiguousarray(stacked.reshape(stacked.shape[:-2] + (-1,)).astype(np_dtype))
    if jax.process_index() != 0:
        return Path(out_dir)
    out = prepare_out_dir(out_dir, force)
    specials = write_tokenizer(tokenizer, out, max_positions) if tokenizer and tokenizer != "none" else {}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = hf_config(model_cfg, dtype=dtype, max_positions=max_positions, special_ids=specials)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: v for k, v in specials.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def folder_fingerprint(folder: str | Path, small_bytes: int = 1 << 20) -> str:
    """A sha256 over a folder's manifest: every file's relative path and size, plus the contents of small files.

    Cheap for a 140 GB teacher yet changes with any new shard, config or tokenizer; it is an identity, not a
    checksum of every weight byte.
    """
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder)}\0{size}\0".encode())
        if size <= small_bytes:
            digest.update(file.read_bytes())
    return digest.hexdigest()
