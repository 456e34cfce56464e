"""GGUF (llama.cpp) interop: Llama-family GGUF files → analogjax params, ModelConfig and a HF tokenizer.

Read with the `gguf` package (memory-mapped; numpy dequantization, no torch). Each tensor is dequantized once to
float32 in the HF layout and handed to the same born-sharded loading that Hugging Face folders use
(`hf.params_from_tensors`), so the tensor table, shape checks and sharding are shared with `analogjax.hf`.

Layout facts this rests on (llama.cpp's convert_hf_to_gguf.py, transformers' modeling_gguf_pytorch_utils.py):
- GGUF lists shapes innermost first; the reader hands out numpy arrays in HF order ([out, in] for a Linear).
- llama.cpp permutes q/k rows per head from rotate-half to interleaved RoPE pairs:
  w.reshape(heads, 2, e/2, d).swapaxes(1, 2). `_unpermute` is its inverse, with kv heads for k.
- No `output.weight` tensor means the output head is the token embedding (tied).
- The tokenizer lives in the metadata (tokenizer.ggml.*): a "gpt2" model is a byte-level BPE whose pre-tokenizer
  regex is named by tokenizer.ggml.pre (llama.cpp's llama-vocab.cpp lists them).

Covered: architecture "llama" (Llama 2/3 shapes, SmolLM, Mistral files written as llama) without RoPE scaling; tensor
types F32, F16, BF16, Q8_0, Q4_0, Q4_1. Anything else is refused with a UserError naming the file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from analogjax.errors import UserError
from analogjax.models.config import ModelConfig
from analogjax.models.hf.read import HFModel, params_from_tensors
from analogjax.runtime import storage

ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# llama.cpp tensor name → HF tensor name ({i} is the block index).
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# llama.* metadata the decoder implements (anything else under the architecture's prefix is refused).
_KNOWN_KEYS = {
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "rope.freq_base",
    "attention.layer_norm_rms_epsilon",
    "vocab_size",
    "rope.dimension_count",
    "attention.key_length",
    "attention.value_length",
    "rope.scaling.type",
    "rope.scaling.factor",
    "expert_count",
    "expert_used_count",
}

# tokenizer.ggml.pre → how text is split before BPE (llama.cpp's llama-vocab.cpp, and each model's tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": "gpt2",
    "gpt2": "gpt2",  # GPT-2's regex, inside the ByteLevel pre-tokenizer
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "codeshell": "digits",  # digits one by one first
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "smaug-bpe": "llama3",
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def open_gguf(path: str | Path) -> GGUFFile:
    """A GGUFFile, shared between callers while the file is unchanged (parsing a 49k-token vocabulary's metadata
    takes seconds, and config, tokenizer, weights and provenance all read it). A file on a bucket is read from a
    copy in the local cache (the file is memory-mapped)."""
    path = Path(storage.local_copy(path))
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _open_cached(str(path.absolute()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


class GGUFFile:
    """One GGUF file opened (memory-mapped) and checked: readable, a covered architecture, every tensor complete."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"GGUF file not found: {self.path}")
        try:
            self.reader = GGUFReader(self.path)
        except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on damaged headers
            raise UserError(
                f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc}); download or convert it again"
            ) from None
        size = self.path.stat().st_size
        for tensor in self.reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
                raise UserError(
                    f"{self.path}: truncated GGUF file (tensor {tensor.name} ends past the file's "
                    f"{size} bytes); download or convert it again"
                )
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise UserError(
                f"{self.path}: unsupported GGUF architecture {self.arch!r} (supported: "
                f"{', '.join(ARCHITECTURES)}); convert a Hugging Face folder and use teacher.hf_path"
            )

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise UserError(f"{self.path}: GGUF metadata has no {key!r}")
        return value

    def tensor_array(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32, in numpy (HF) axis order."""
        from gguf import quants

        tensor = self.tensors[name]
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise UserError(
                f"{self.path}: tensor {name} has type {kind}, which analogjax does not dequantize "
                f"(supported: {', '.join(SUPPORTED_TYPES)}); requantize the file to one of them "
                "(llama.cpp's llama-quantize) or use the Hugging Face folder"
            )
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# Metadata → ModelConfig


def model_config_from_gguf(path: str | Path, gguf_file: GGUFFile | None = None) -> ModelConfig:
    """The ModelConfig of a Llama-family GGUF file; UserError for metadata the decoder does not implement."""
    f = gguf_file or open_gguf(path)
    prefix = f"{f.arch}."
    for key in f.reader.fields:
        if key.startswith(prefix) and key[len(prefix) :] not in _KNOWN_KEYS:
            raise UserError(f"{f.path}: GGUF metadata {key} is not implemented by the analogjax decoder")
    scaling = f.get(prefix + "rope.scaling.type", "none")
    if scaling != "none" and not (scaling == "linear" and float(f.get(prefix + "rope.scaling.factor", 1.0)) == 1.0):
        raise UserError(f"{f.path}: RoPE scaling {scaling!r} is not implemented by the analogjax decoder")
    if int(f.get(prefix + "expert_count", 0)):
        raise UserError(f"{f.path}: mixture-of-experts GGUF files are not supported")
    d_model = int(f.require(prefix + "embedding_length"))
    heads = int(f.require(prefix + "attention.head_count"))
    head_dim = int(f.get(prefix + "attention.key_length", d_model // heads))
    if int(f.get(prefix + "attention.value_length", head_dim)) != head_dim:
        raise UserError(f"{f.path}: different key and value head sizes are not supported")
    if int(f.get(prefix + "rope.dimension_count", head_dim)) != head_dim:
        raise UserError(
            f"{f.path}: partial rotary embeddings (rope.dimension_count "
            f"{f.get(prefix + 'rope.dimension_count')} < head size {head_dim}) are not supported"
        )
    if "token_embd.weight" not in f.tensors:
        raise UserError(f"{f.path}: no token_embd.weight tensor")
    embed_rows = int(f.tensors["token_embd.weight"].shape[1])
    vocab = int(f.get(prefix + "vocab_size", embed_rows))
    return ModelConfig(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(f.require(prefix + "block_count")),
        n_heads=heads,
        n_kv_heads=int(f.get(prefix + "attention.head_count_kv", heads)),
        head_dim=0 if head_dim * heads == d_model else head_dim,  # "d_model // n_heads", as models/hf/ spells it
        d_ff=int(f.require(prefix + "feed_forward_length")),
        rope_theta=float(f.get(prefix + "rope.freq_base", 10000.0)),
        norm_eps=float(f.get(prefix + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in f.tensors,
    )


# ----------------------------------------------------------------------------------------------------------------
# Weights


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (interleaved RoPE pairs back to rotate-half halves)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUFTensors:
    """HF-named, HF-laid-out float32 tensors of a GGUF file (what hf.params_from_tensors reads), each dequantized
    once and kept until the loader lets go of this object."""

    def __init__(self, gguf_file: GGUFFile, cfg: ModelConfig):
        self.file = gguf_file
        self.cfg = cfg
        self.gguf_name: dict[str, str] = {}
        for name in gguf_file.tensors:
            self.gguf_name[_hf_name(name, gguf_file.path)] = name
        self._arrays: dict[str, np.ndarray] = {}

    def _name(self, hf_name: str) -> str:
        if hf_name not in self.gguf_name:
            raise UserError(f"{self.file.path}: GGUF file has no tensor for {hf_name}")
        return self.gguf_name[hf_name]

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.file.tensors[self._name(hf_name)].shape))

    def slice(self, hf_name: str) -> np.ndarray:
        if hf_name not in self._arrays:
            name = self._name(hf_name)
            w = self.file.tensor_array(name)
            if ".attn_q." in name:
                w = _unpermute(w, self.cfg.n_heads)
            elif ".attn_k." in name:
                w = _unpermute(w, self.cfg.kv_heads)
            self._arrays[hf_name] = w
        return self._arrays[hf_name]


def _hf_name(gguf_name: str, path: Path) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        pattern = ".".join(["blk", "{i}", *parts[2:]])
        if pattern in _TENSOR_NAMES:
            return _TENSOR_NAMES[pattern].format(i=int(parts[1]))
    elif gguf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[gguf_name]
    raise UserError(
        f"{path}: GGUF tensor {gguf_name} is not part of the analogjax decoder (e.g. biases, RoPE "
        "frequency factors or experts); this file's model is not supported"
    )


def load_params(path: str | Path, model_cfg: ModelConfig, mesh, rules) -> dict:
    """A GGUF file's weights as analogjax params ({"params": ...}), each array born sharded under `rules`."""
    f = open_gguf(path)
    found = model_config_from_gguf(path, f)
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "dim_per_head", "d_ff", "tie_embeddings"):
        if getattr(found, name) != getattr(model_cfg, name):
            raise UserError(
                f"{path}: the GGUF file has {name} {getattr(found, name)}, the model config says "
                f"{getattr(model_cfg, name)}"
            )
    return params_from_tensors(_GGUFTensors(f, model_cfg), model_cfg, mesh, rules, f"{path}: GGUF metadata")


class GGUFModel(HFModel):
    """A GGUF file as a callable: int32 tokens [b, s] → float32 logits [b, s, v]; params live on `mesh`."""

    read_config = staticmethod(model_config_from_gguf)
    read_params = staticmethod(load_params)


def load(path: str | Path, *, mesh=None, rules=None) -> GGUFModel:
    """`analogjax.models.gguf.load(path)(tokens) -> logits`."""
    return GGUFModel(path, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_from_gguf(path: str | Path, gguf_file: GGUFFile | None = None):
    """The file's tokenizer as a HF `tokenizers` Tokenizer, plus its special tokens {bos_token, eos_token, pad_token}.

    Only byte-level BPE ("gpt2" models) is rebuilt; control tokens become special added tokens and user-defined
    ones plain added tokens, as llama.cpp matches both whole in text.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    f = gguf_file or open_gguf(path)
    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f'{f.path}: tokenizer model {kind!r} is not supported (only byte-level BPE, "gpt2"); '
            "set data.tokenizer to the model's tokenizer.json"
        )
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise UserError(
            f"{f.path}: tokenizer pre-tokenizer {pre!r} is not supported (supported: "
            f"{', '.join(sorted(_PRE_TOKENIZERS))}); set data.tokenizer to the model's tokenizer.json"
        )
    tokens = [str(t) for t in f.require("tokenizer.ggml.tokens")]
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
    types = [int(t) for t in f.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _PRE_TOKENIZERS[pre]
    if split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind_ in zip(tokens, types) if kind_ == _CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED]
    )
    specials = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        index = f.get(f"tokenizer.ggml.{key}")
        if index is not None and 0 <= int(index) < len(tokens):
            specials[name] = tokens[int(index)]
    return tok, specials


def write_tokenizer(path: str | Path, out_dir: str | Path) -> Path:
    """tokenizer.json + tokenizer_config.json (its specials, which `data.tokenize.load_tokenizer` reads) rebuilt from
    a GGUF file into `out_dir`. Returns the tokenizer.json path (a `data.tokenizer` value)."""
    tok, specials = tokenizer_from_gguf(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "tokenizer.json"


# ----------------------------------------------------------------------------------------------------------------
# Provenance


def gguf_provenance(path: str | Path) -> dict:
    """What a model card says about a GGUF teacher: the file's sha256 and its GGUF metadata."""
    from gguf import LlamaFileType

    f = open_gguf(path)
    digest = hashlib.sha256()
    with open(f.path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    file_type = f.get("general.file_type")
    try:
        file_type_name = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    counts: dict[str, int] = {}
    for tensor in f.reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return {
        "file": f.path.name,
        "sha256": digest.hexdigest(),
        "bytes": f.path.stat().st_size,
        "name": f.get("general.name"),
        "architecture": f.arch,
        "license": f.get("general.license"),
        "file_type": file_type_name,
        "tensor_types": dict(sorted(counts.items())),
    }


def config_fields(path: str | Path) -> dict:
    """The ModelConfig of a GGUF file as a plain dict (what TeacherConfig fills teacher.model from)."""
    return dataclasses.asdict(model_config_from_gguf(path))


__all__ = [
    "GGUFFile",
    "GGUFModel",
    "load",
    "load_params",
    "model_config_from_gguf",
    "tokenizer_from_gguf",
    "write_tokenizer",
    "gguf_provenance",
    "config_fields",
    "SUPPORTED_TYPES",
    "ARCHITECTURES",
]
