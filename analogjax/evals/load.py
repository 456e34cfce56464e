"""A model named on the command line, as an lm-eval model: `load_lm(spec)` for an analogjax run (its workdir or
checkpoints directory), a Hugging Face folder (a release bundle is one), or a GGUF file.

Each is tokenized as its own artefacts say: a HF folder or bundle by its tokenizer as transformers loads it (as
lm-eval's HF model does, so the two score the same tokens), a GGUF file by the tokenizer it embeds, a run by its
data.tokenizer with its add_bos. The context is the HF config's max_position_embeddings (a GGUF file's
context_length), or for a run the sequence length it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analogjax.errors import UserError

DEFAULT_CONTEXT = 2048  # HFLM's default when a model states none


class HFCodec:
    """A transformers tokenizer called as lm-eval's HF model calls it (tokenizers' own file where transformers is
    not installed)."""

    def __init__(self, tokenizer: Any, raw: Any = None):
        self._tok, self._raw = tokenizer, raw
        if tokenizer is not None:
            self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
            self._bos_text = tokenizer.bos_token
        else:
            self.bos_id = self.eos_id = None
            self._bos_text = None

    @classmethod
    def from_folder(cls, path: Path) -> HFCodec:
        try:
            import transformers
        except ImportError:
            if not (path / "tokenizer.json").is_file():
                raise UserError(f"{path} has no tokenizer.json: lm-eval's tasks are text") from None
            from tokenizers import Tokenizer

            return cls(None, Tokenizer.from_file(str(path / "tokenizer.json")))
        try:
            return cls(transformers.AutoTokenizer.from_pretrained(str(path)))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: no usable tokenizer ({e})") from None

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if self._tok is None:
            return self._raw.encode(text, add_special_tokens=add_special_tokens is not False).ids
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and self._bos_text and text.startswith(self._bos_text):
            kwargs = {"add_special_tokens": False}  # the text brings its own BOS
        return list(self._tok.encode(text, **kwargs))

    def decode(self, ids: Sequence[int]) -> str:
        if self._tok is None:
            return self._raw.decode(list(ids), skip_special_tokens=True)
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


class RunCodec:
    """An analogjax tokenizer (data.tokenize) with the run's BOS setting."""

    def __init__(self, tokenizer: Any, add_bos: bool):
        self._tok = tokenizer
        self.add_bos = add_bos
        self.bos_id = getattr(tokenizer, "bos_id", None)
        self.eos_id = getattr(tokenizer, "eos_id", None)
        if add_bos and self.bos_id is None:
            raise UserError("data.add_bos is set but the run's tokenizer has no BOS token")

    @classmethod
    def for_data(cls, data) -> RunCodec:
        """The run's data.tokenizer (or the one its prepared shards name)."""
        from analogjax.data.tokenize import load_tokenizer, resolve_tokenizer

        spec = resolve_tokenizer(data)
        if spec == "none":
            raise UserError(
                "the run's data.tokenizer is none and its sources name no tokenizer: lm-eval's tasks are text, "
                "so there is nothing to tokenize them with"
            )
        return cls(load_tokenizer(spec), data.add_bos)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        bos = [int(self.bos_id)] if self.bos_id is not None and self.add_bos and add_special_tokens is not False else []
        return bos + [int(t) for t in self._tok.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        specials = {self.bos_id, self.eos_id}
        return self._tok.decode([i for i in ids if i not in specials])


def _hf_context(path: Path) -> int:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return DEFAULT_CONTEXT
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(raw.get(key), int):
            return raw[key]
    return DEFAULT_CONTEXT


def _gguf_codec_and_context(path: Path) -> tuple[HFCodec, int]:
    from analogjax.models.gguf import open_gguf, tokenizer_from_gguf

    f = open_gguf(path)
    tok, specials = tokenizer_from_gguf(path, f)
    try:
        import transformers
    except ImportError:
        raise UserError(f"{path}: tokenizing for lm-eval from a GGUF file needs the transformers package") from None
    codec = HFCodec(transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials))
    context = f.get(f"{f.get('general.architecture', '')}.context_length")
    return codec, int(context) if context else DEFAULT_CONTEXT


def load_lm(spec: str, *, batch_size: int | None = None, max_gen_toks: int | None = None):
    """An `AnalogLM` for `spec`: a GGUF file, a HF folder or release bundle (config.json), or an analogjax run."""
    from analogjax.evals.lm import DEFAULT_BATCH, DEFAULT_GEN_TOKENS, AnalogLM

    path = Path(spec)
    options = {"batch_size": batch_size or DEFAULT_BATCH, "max_gen_toks": max_gen_toks or DEFAULT_GEN_TOKENS}
    if path.is_file() and path.suffix == ".gguf":
        from analogjax.models import gguf

        codec, context = _gguf_codec_and_context(path)
        return AnalogLM(gguf.load(path), codec, max_length=context, name=path.name, **options)
    if path.is_dir() and (path / "config.json").is_file():
        from analogjax.models import hf

        return AnalogLM(
            hf.load(path), HFCodec.from_folder(path), max_length=_hf_context(path), name=path.name, **options
        )
    if not path.exists():
        raise UserError(f"--model: no such file or folder {spec}")
    from analogjax import mesh as mesh_lib
    from analogjax.models.model import Model
    from analogjax.run_dir import load_student, run_config

    config = run_config(path)[0]
    run_codec = RunCodec.for_data(config.data)  # refused before the checkpoint is read
    student = load_student(path, config)
    model = Model(config.model, student.params, mesh=student.mesh, rules=mesh_lib.STUDENT_RULES)
    return AnalogLM(
        model, run_codec, max_length=config.data.seq_len, name=f"analogjax run, step {student.step}", **options
    )
