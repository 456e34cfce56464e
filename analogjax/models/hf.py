"""Hugging Face interop: Llama-family safetensors + config.json ⇄ analogjax params.

Import reads tensor by tensor onto the mesh: each device's shard is cut out of the safetensors files with
`get_slice`, so no host ever holds a whole model (a stacked [layers, ...] shard reads only the layers it covers).
Export writes the HF layout back (process 0), so `AutoModelForCausalLM.from_pretrained` loads it with no custom code.

Layout facts this rests on:
- HF Linear weights are [out, in]; ours are [in, ...out] with heads split out (wq [d, h, e], wo [h, e, d]).
- HF Llama-family q/k projections already use the rotate-half RoPE convention, as ours do: no permutation.
- Gemma's RMSNorm scales by (1 + weight): that is our `norm_offset=1` with scale = weight, so norms copy as they are.

Covered: Llama 2/3, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma (embedding scale, norm offset,
tanh-GELU). Anything else (RoPE scaling, output biases, Gemma 2's extra norms) is refused with a UserError.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safetensors can hand out bf16 slices
import numpy as np

from analogjax.errors import UserError
from analogjax.models.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF architecture name → the model_type that goes with it.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_tanh": "gelu_tanh"}


# ----------------------------------------------------------------------------------------------------------------
# config.json ⇄ ModelConfig


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name} (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON ({exc})") from None


def model_config_from_hf(path: str | Path) -> ModelConfig:
    """The ModelConfig of a HF folder's config.json; UserError for architectures or features we do not cover."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"Hugging Face model folder not found: {path}")
    hf = _read_json(path / CONFIG_FILE)
    arch = (hf.get("architectures") or [None])[0]
    model_type = ARCHITECTURES.get(arch) if arch else hf.get("model_type")
    if model_type not in ARCHITECTURES.values():
        raise UserError(f"{path}: unsupported architecture {arch or hf.get('model_type')!r} "
                        f"(supported: {', '.join(ARCHITECTURES)})")

    def unsupported(feature: str):
        raise UserError(f"{path}: {arch or model_type} with {feature} is not supported by the analogjax decoder")

    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        unsupported(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    if hf.get("attention_bias") and model_type != "qwen2":
        unsupported("attention_bias (the output projection's bias)")
    if hf.get("mlp_bias"):
        unsupported("mlp_bias")
    if hf.get("use_sliding_window"):
        unsupported("use_sliding_window")
    # Mistral's sliding_window (4096 in v0.1, null later) changes nothing for sequences up to the window.
    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if model_type == "gemma" and act_name == "gelu":
        act_name = "gelu_pytorch_tanh"  # what transformers itself runs for Gemma's legacy "gelu"
    if act_name not in _ACTIVATIONS:
        unsupported(f"activation {act_name!r}")
    gemma = model_type == "gemma"
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or 0)
    if head_dim * heads == int(hf.get("hidden_size", -1)):
        head_dim = 0  # our spelling of "d_model // n_heads", so configs compare equal after a round trip
    try:
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            d_ff=int(hf["intermediate_size"]),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            activation=_ACTIVATIONS[act_name],
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            embed_scale=gemma,
            norm_offset=1.0 if gemma else 0.0,
        )
    except KeyError as exc:
        raise UserError(f"{path / CONFIG_FILE}: missing key {exc.args[0]!r}") from None


def architecture_for(cfg: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) of the HF class that computes exactly what `cfg` does."""
    gemma_like = cfg.embed_scale or cfg.norm_offset != 0.0
    if gemma_like:
        if not (cfg.embed_scale and cfg.norm_offset == 1.0) or cfg.qkv_bias or cfg.qk_norm:
            raise UserError("no Hugging Face architecture matches embed_scale/norm_offset other than Gemma's "
                            "(embed_scale=true, norm_offset=1, no qkv_bias, no qk_norm)")
        return "GemmaForCausalLM", "gemma"
    if cfg.qkv_bias and cfg.qk_norm:
        raise UserError("no Hugging Face architecture has both qkv_bias and qk_norm")
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM", "qwen2"
    if cfg.qk_norm:
        return "Qwen3ForCausalLM", "qwen3"
    return "LlamaForCausalLM", "llama"


def hf_config(cfg: ModelConfig, *, dtype: str = "float32", max_positions: int = 4096,
              special_ids: dict[str, int | None] | None = None) -> dict[str, Any]:
    """config.json for `cfg` (architecture chosen by `architecture_for`)."""
    arch, model_type = architecture_for(cfg)
    act = "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "silu"
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": act,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if model_type == "gemma":
        out["hidden_activation"] = act
    if model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    for key, value in (special_ids or {}).items():
        if value is not None:
            out[key] = int(value)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The tensor table: one row per analogjax param, saying which HF tensor holds it and how the axes move.


@dataclass(frozen=True)
class TensorMap:
    """ours (per layer) = reshape(hf, flatten(groups)).transpose(perm).

    groups: the HF tensor's dims, each split into factors (q_proj [h·e, d] → ((h, e), (d,))).
    perm: for each of our dims, the index of the split dim it takes.
    """

    ours: tuple[str, ...]  # path under params["params"]
    hf: str  # HF tensor name; "{i}" is the layer index for stacked params
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    stacked: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(g) for g in self.groups)

    @property
    def split_shape(self) -> tuple[int, ...]:
        return tuple(n for g in self.groups for n in g)

    def names(self, n_layers: int) -> list[str]:
        return [self.hf.format(i=i) for i in range(n_layers)] if self.stacked else [self.hf]

    def to_hf(self, ours_layer: np.ndarray) -> np.ndarray:
        """Our per-layer array → the HF tensor."""
        return np.transpose(ours_layer, np.argsort(self.perm)).reshape(self.hf_shape)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    v, d, f = cfg.vocab_size, cfg.d_model, cfg.d_ff
    h, k, e = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    layer = "model.layers.{i}."
    maps = [
        TensorMap(("embedding",), "model.embed_tokens.weight", ((v,), (d,)), (0, 1), False),
        TensorMap(("final_norm", "scale"), "model.norm.weight", ((d,),), (0,), False),
        TensorMap(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", ((d,),), (0,), True),
        TensorMap(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", ((d,),), (0,), True),
        TensorMap(("layers", "attn", "wq"), layer + "self_attn.q_proj.weight", ((h, e), (d,)), (2, 0, 1), True),
        TensorMap(("layers", "attn", "wk"), layer + "self_attn.k_proj.weight", ((k, e), (d,)), (2, 0, 1), True),
        TensorMap(("layers", "attn", "wv"), layer + "self_attn.v_proj.weight", ((k, e), (d,)), (2, 0, 1), True),
        TensorMap(("layers", "attn", "wo"), layer + "self_attn.o_proj.weight", ((d,), (h, e)), (1, 2, 0), True),
        TensorMap(("layers", "mlp", "w_gate"), layer + "mlp.gate_proj.weight", ((f,), (d,)), (1, 0), True),
        TensorMap(("layers", "mlp", "w_up"), layer + "mlp.up_proj.weight", ((f,), (d,)), (1, 0), True),
        TensorMap(("layers", "mlp", "w_down"), layer + "mlp.down_proj.weight", ((d,), (f,)), (1, 0), True),
    ]
    if cfg.qkv_bias:
        for name, heads in (("q", h), ("k", k), ("v", k)):
            maps.append(TensorMap(("layers", "attn", f"w{name}_bias"), layer + f"self_attn.{name}_proj.bias",
                                  ((heads, e),), (0, 1), True))
    if cfg.qk_norm:
        for name in ("q", "k"):
            maps.append(TensorMap(("layers", "attn", f"{name}_norm", "scale"), layer + f"self_attn.{name}_norm.weight",
                                  ((e,),), (0,), True))
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", ((v,), (d,)), (1, 0), False))
    return maps


# ----------------------------------------------------------------------------------------------------------------
# Import


class _SafetensorFiles:
    """Which file holds which tensor (single file or a sharded index), with open handles kept per file."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            self.where = {name: folder / file for name, file in weight_map.items()}
        elif (folder / WEIGHTS_FILE).is_file():
            self.where = None
            self.single = folder / WEIGHTS_FILE
        else:
            raise UserError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are read)")
        self._handles: dict[Path, Any] = {}
        if self.where is None:
            self.where = {name: self.single for name in self._open(self.single).keys()}
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
        if name not in self.where:
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
    for group in tmap.groups:
        parts = [split_index[pos + j].indices(n) for j, n in enumerate(group)]
        inner = math.prod(group[1:])
        # A contiguous range of the group's leading factor; trailing factors are cut after reshaping (they are
        # head_dim in practice, never sharded, so nothing is read twice).
        read.append(slice(parts[0][0] * inner, parts[0][1] * inner))
        after.append([slice(None)] + [slice(a, b) for a, b, _ in parts[1:]])
        pos += len(group)
    block = np.asarray(tensor_slice[tuple(read)])
    shape = []
    for group, r in zip(tmap.groups, read):
        shape += [(r.stop - r.start) // math.prod(group[1:]), *group[1:]]
    block = block.reshape(shape)[tuple(s for sl in after for s in sl)]
    return np.transpose(block, tmap.perm).astype(np.float32)


def load_params(path: str | Path, model_cfg: ModelConfig, mesh, rules) -> dict:
    """A HF folder's weights as analogjax params ({"params": ...}), each array born sharded under `rules`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"teacher.hf_path: Hugging Face model folder not found: {path}")
    return params_from_tensors(_SafetensorFiles(path), model_cfg, mesh, rules, f"{path}: config.json")


def params_from_tensors(files, model_cfg: ModelConfig, mesh, rules, source: str) -> dict:
    """Params ({"params": ...}) born sharded from `files`: anything with `shape(hf_name)` and `slice(hf_name)`
    (an object indexable like a numpy array in the HF layout). `source` names where the shapes come from."""
    from analogjax import mesh as mesh_lib
    from analogjax.models.transformer import Transformer

    abstract = mesh_lib.abstract_sharded(Transformer(model_cfg).init_boxed, mesh, rules)["params"]
    params: dict = {}
    for tmap in tensor_maps(model_cfg):
        target = _get(abstract, tmap.ours)
        names = tmap.names(model_cfg.n_layers)
        for name in names:
            found = files.shape(name)
            if found != tmap.hf_shape:
                raise UserError(f"{source}: tensor {name} has shape {list(found)}, but the config implies "
                                f"{list(tmap.hf_shape)}")
        _set(params, tmap.ours, _sharded_array(files, tmap, names, target))
    return {"params": params}


def _sharded_array(files: _SafetensorFiles, tmap: TensorMap, names: list[str], target) -> jax.Array:
    cache: dict[tuple, np.ndarray] = {}  # replicas of one shard on several local devices are read once

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, target.shape))
        if key not in cache:
            if tmap.stacked:
                layers = range(*index[0].indices(target.shape[0]))
                cache[key] = np.stack([_read_block(files.slice(names[i]), tmap, index[1:]) for i in layers])
            else:
                cache[key] = _read_block(files.slice(names[0]), tmap, index)
        return cache[key]

    return jax.make_array_from_callback(target.shape, target.sharding, read)


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


class HFModel:
    """A HF checkpoint as a callable: int32 tokens [b, s] → float32 logits [b, s, v]; params live on `mesh`."""

    def __init__(self, path: str | Path, *, mesh=None, rules=None):
        from analogjax import mesh as mesh_lib
        from analogjax.models.transformer import Transformer

        self.config = self.read_config(path)
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(-1, 1, 1)
        self.rules = tuple(rules if rules is not None else mesh_lib.TEACHER_RULES)
        self.model = Transformer(self.config)
        self.params = self.read_params(path, self.config, self.mesh, self.rules)
        self._logits = jax.jit(self.model.__call__)

    # Where the config and weights come from; other file formats (GGUF) override these two.
    read_config = staticmethod(model_config_from_hf)
    read_params = staticmethod(load_params)

    def __call__(self, tokens_bs, segment_ids_bs=None, positions_bs=None) -> jax.Array:
        import flax.linen as nn

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
            return self._logits(self.params, jax.numpy.asarray(tokens_bs, jax.numpy.int32), segment_ids_bs,
                                positions_bs)


def load(path: str | Path, *, mesh=None, rules=None) -> HFModel:
    """`analogjax.hf.load(path)(tokens) -> logits`."""
    return HFModel(path, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------------------------------------------
# Export


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


def save(params, model_cfg: ModelConfig, out_dir: str | Path, tokenizer: str | None = None, *, force: bool = False,
         dtype: str = "float32", max_positions: int = 4096) -> Path:
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
    tensors: dict[str, np.ndarray] = {}
    for tmap in tensor_maps(model_cfg):
        try:
            value = _host(_get(tree, tmap.ours))
        except KeyError:
            raise UserError(f"params have no {'/'.join(tmap.ours)} but the model config needs it") from None
        expected = ((model_cfg.n_layers,) if tmap.stacked else ()) + tuple(
            tmap.split_shape[p] for p in tmap.perm)
        if value.shape != expected:
            raise UserError(f"params {'/'.join(tmap.ours)} has shape {list(value.shape)}, the model config implies "
                            f"{list(expected)}")
        layers = list(value) if tmap.stacked else [value]
        for name, layer in zip(tmap.names(model_cfg.n_layers), layers):
            tensors[name] = np.ascontiguousarray(tmap.to_hf(layer).astype(np_dtype))
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


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer files


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte as one printable character (what ByteLevel pre-tokenizers expect).

    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to code points from 256 on, in order.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 256, 257, 258: ByteTokenizer's pad, bos, eos


def byte_tokenizer_json():
    """The "bytes" tokenizer (ids 0..255 are UTF-8 bytes, then pad, bos, eos) as a HF `tokenizers` Tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: every byte of the text maps to exactly its own id.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BYTE_SPECIALS])
    return tok


def write_tokenizer(spec: str, out: Path, max_length: int) -> dict[str, int | None]:
    """tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast: no custom code). Returns special ids."""
    from analogjax.data.tokenize import load_tokenizer

    ours = load_tokenizer(spec)
    if spec == "bytes":
        byte_tokenizer_json().save(str(out / "tokenizer.json"))
        names = dict(zip(("pad_token", "bos_token", "eos_token"), BYTE_SPECIALS))
    elif ours.kind == "hf":
        from tokenizers import Tokenizer

        shutil.copyfile(spec, out / "tokenizer.json")
        tok = Tokenizer.from_file(spec)
        names = {key: tok.id_to_token(i) for key, i in
                 (("bos_token", ours.bos_id), ("eos_token", ours.eos_id), ("pad_token", ours.pad_id))
                 if i is not None}
    else:
        raise UserError(f"export: tokenizer {spec!r} ({ours.kind}) cannot be written as a HF tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **names}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")
    return {"bos_token_id": ours.bos_id, "eos_token_id": ours.eos_id, "pad_token_id": ours.pad_id}


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


__all__ = ["load", "load_params", "params_from_tensors", "model_config_from_hf", "save", "HFModel", "architecture_for",
           "hf_config", "tensor_maps", "byte_tokenizer_json", "folder_fingerprint", "check_out_dir", "prepare_out_dir"]
