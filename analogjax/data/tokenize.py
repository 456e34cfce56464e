"""Tokenizers behind one small interface: vocab_size, bos/eos/pad ids, encode, encode_batch, decode.

Kinds: "bytes" (UTF-8 bytes plus three specials; needs no file), a HF `tokenizers` JSON file, a SentencePiece
model (only when the optional `sentencepiece` package is installed) and "none" (the corpus is pre-tokenized).
`train_bpe_tokenizer` trains the byte-level BPE the demo uses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import NoReturn, TypeAlias

import numpy as np

from analogjax.errors import UserError

# Names under which tokenizer files commonly spell their specials, most specific first. Used only when no
# tokenizer_config.json next to the tokenizer says which tokens they are.
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "[EOS]", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<unk>")

# A model may pad its embedding table past the tokenizer's vocabulary for efficient tiling
# (Qwen2.5: 151936 -> 152064); anything beyond the next multiple of this is a mismatch, not padding.
VOCAB_PADDING_MULTIPLE = 1024


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; pad, bos and eos follow. Needs no file and never sees an unknown token."""

    kind = "bytes"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A HF `tokenizers` JSON file. Specials come from a sibling tokenizer_config.json, else common names."""

    kind = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exceptions for unreadable or malformed files
            raise UserError(f"{path}: not a readable HF tokenizers JSON file ({e})") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = _file_fingerprint(path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        configured = configured_specials(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        self.bos_id = _special_id(vocab, configured.get("bos_token"), _BOS_NAMES)
        self.eos_id = _special_id(vocab, configured.get("eos_token"), _EOS_NAMES)
        pad = _special_id(vocab, configured.get("pad_token"), _PAD_NAMES)
        # Padding is masked out of every loss, so any id will do when the tokenizer has no pad token.
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        # Specials are added by the pipeline (add_bos/add_eos); a post-processor adding them again would double them.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # The Rust side spreads a batch over all cores.
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: str):
        try:
            import sentencepiece
        except ImportError:
            raise UserError(
                f"data.tokenizer {path} is a SentencePiece model but the sentencepiece package is not installed "
                "(pip install 'analogjax[sentencepiece]')"
            ) from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise UserError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.path = path
        self.vocab_size = int(self._sp.get_piece_size())
        self.fingerprint = _file_fingerprint(path)
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        self.eos_id = int(self._sp.eos_id()) if self._sp.eos_id() >= 0 else None
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class PretokenizedVocabulary:
    """data.tokenizer "none": every source holds token ids already. Text cannot be encoded."""

    kind = "none"
    vocab_size = None
    bos_id = None
    eos_id = None
    pad_id = 0
    fingerprint = "none"

    def encode(self, text: str) -> NoReturn:
        raise UserError('data.tokenizer is "none" but a source holds text: name a tokenizer file or "bytes"')

    encode_array = encode

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Without a vocabulary the ids themselves are the most faithful rendering.
        return " ".join(str(int(i)) for i in ids)


# Every tokenizer load_tokenizer can return; they share kind, vocab_size, bos/eos/pad ids, fingerprint, encode,
# encode_array, encode_batch and decode.
AnyTokenizer: TypeAlias = ByteTokenizer | HFTokenizer | SentencePieceTokenizer | PretokenizedVocabulary


def load_tokenizer(spec: str) -> AnyTokenizer:
    """The tokenizer named by a data.tokenizer value."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "none":
        return PretokenizedVocabulary()
    if not os.path.exists(spec):
        raise UserError(
            f'data.tokenizer: no such file {spec} (expected a tokenizer .json, a .model, "bytes" or "none")'
        )
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    return HFTokenizer(spec)


def tokenizer_for(data) -> AnyTokenizer:
    """The tokenizer of a DataConfig (for data.tokenizer "none", the one its prepared sources were made with)."""
    return load_tokenizer(resolve_tokenizer(data))


def resolve_tokenizer(data) -> str:
    """The tokenizer spec a DataConfig's token ids belong to: data.tokenizer, or for "none" the tokenizer that
    `analogjax prepare` recorded in the sources' metadata, checked against its recorded fingerprint ("none" when no
    source says). The tokenizer travels with the data, so a run, its export and its release all name the same one.
    """
    if data.tokenizer != "none":
        return data.tokenizer
    recorded = [
        r
        for r in (_prepared_tokenizer(s.path, f"data.sources[{i}]") for i, s in enumerate(data.sources))
        if r is not None
    ]
    for where, spec, fingerprint in recorded[1:]:
        if fingerprint != recorded[0][2]:
            raise UserError(
                f"{recorded[0][0]} and {where} were prepared with different tokenizers ({recorded[0][1]} "
                f"and {spec}): prepare them with one tokenizer, or name it in data.tokenizer"
            )
    return recorded[0][1] if recorded else "none"


def _prepared_tokenizer(source_path: str, key: str) -> tuple[str, str, str] | None:
    """(where, tokenizer spec, fingerprint) recorded by `analogjax prepare` for one source; None when the source is
    not a prepared directory or its metadata names no tokenizer. The spec is the file found at the recorded path (a
    relative one is tried from the working directory, then from the prepared directory), or "bytes"."""
    from analogjax.data import paths

    if source_path == "stdlib" or any(ch in source_path for ch in "*?[") or not paths.is_dir(source_path):
        return None
    meta_path = paths.join(source_path, paths.METADATA_FILE)
    if not paths.exists(meta_path):
        return None
    try:
        metadata = json.loads(paths.read_bytes(meta_path))
    except ValueError as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    spec, fingerprint = metadata.get("tokenizer"), metadata.get("tokenizer_fingerprint")
    if not spec or spec == "none":
        return None
    where = f"{key} ({meta_path})"
    if not fingerprint:
        raise UserError(f"{where} names tokenizer {spec} without its fingerprint: set data.tokenizer to it")
    if spec != "bytes":
        candidates = (
            [spec]
            if os.path.isabs(spec)
            else [spec, os.path.join(source_path, spec), os.path.join(source_path, os.path.basename(spec))]
        )
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            raise UserError(
                f"{where}: the shards were prepared with tokenizer {spec}, which is missing; put it back "
                "or set data.tokenizer to a copy of it"
            )
        spec = found
    actual = load_tokenizer(spec).fingerprint
    if actual != fingerprint:
        raise UserError(
            f"{where}: tokenizer {spec} has fingerprint {actual}, but the shards were prepared with "
            f"fingerprint {fingerprint}: it is not the tokenizer that made them"
        )
    return where, spec, fingerprint


def check_vocab(tokenizer, vocab_size: int, where: str = "data.tokenizer") -> None:
    """UserError unless the model's vocab_size fits the tokenizer (equal, or padded to the next tiling multiple)."""
    check_vocab_size(tokenizer.vocab_size, vocab_size, where)


def check_vocab_size(token_count: int | None, vocab_size: int, where: str) -> None:
    """As check_vocab, for a vocabulary known only by its size (None: unknown, nothing to check)."""
    if token_count is None:
        return
    limit = -(-token_count // VOCAB_PADDING_MULTIPLE) * VOCAB_PADDING_MULTIPLE
    if not token_count <= vocab_size <= limit:
        raise UserError(
            f"{where} has {token_count} tokens but the model's vocab_size is {vocab_size}: "
            f"they must agree (the model may pad up to {limit})"
        )


def encode_document(tokenizer, text: str, *, add_bos: bool, add_eos: bool) -> np.ndarray:
    """Token ids of one document as int32, with the configured specials around it."""
    body = tokenizer.encode_array(text)
    return _with_specials(tokenizer, body, add_bos=add_bos, add_eos=add_eos)


def encode_documents(tokenizer, texts: Sequence[str], *, add_bos: bool, add_eos: bool) -> list[np.ndarray]:
    return [_with_specials(tokenizer, b, add_bos=add_bos, add_eos=add_eos) for b in tokenizer.encode_batch(texts)]


def check_specials(tokenizer, *, add_bos: bool, add_eos: bool) -> None:
    """UserError if the configured begin/end-of-text tokens do not exist in this tokenizer."""
    for wanted, token_id, what, flag in (
        (add_bos, tokenizer.bos_id, "begin", "add_bos"),
        (add_eos, tokenizer.eos_id, "end", "add_eos"),
    ):
        if wanted and token_id is None:
            raise UserError(
                f"the tokenizer ({getattr(tokenizer, 'path', tokenizer.kind)}) has no {what}-of-text token: "
                f"set data.{flag}: false"
            )


def _with_specials(tokenizer, body: np.ndarray, *, add_bos: bool, add_eos: bool) -> np.ndarray:
    check_specials(tokenizer, add_bos=add_bos, add_eos=add_eos)
    if not add_bos and not add_eos:
        return body.astype(np.int32, copy=False)
    head = [tokenizer.bos_id] if add_bos else []
    tail = [tokenizer.eos_id] if add_eos else []
    return np.concatenate([np.asarray(head, np.int32), body.astype(np.int32, copy=False), np.asarray(tail, np.int32)])


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str) -> str:
    """Trains a byte-level BPE (GPT-2 style pre-tokenization) with <pad>=0, <bos>=1, <eos>=2; returns out_path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<bos>", "<eos>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise UserError(f"BPE vocab_size must be at least {len(alphabet) + len(specials)} (got {vocab_size})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out_path)
    return out_path


def _file_fingerprint(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def configured_specials(config_path: str) -> dict[str, str]:
    """The bos/eos/pad token strings a tokenizer_config.json names ({} when there is no such file)."""
    if not os.path.exists(config_path):
        return {}
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path}: unreadable tokenizer config ({e})") from None
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # transformers writes AddedToken objects as {"content": ..., ...}
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _special_id(vocab: dict[str, int], configured: str | None, names: Sequence[str]) -> int | None:
    if configured is not None and configured in vocab:
        return vocab[configured]
    for name in names:
        if name in vocab:
            return vocab[name]
    return None
