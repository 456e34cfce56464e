"""Prompts for on-policy distillation, drawn from the training documents of the run's own data.

Per source, one of two kinds (distill.on_policy.prompts; `auto` decides from the source's first record):
- field: a JSONL source whose records carry `prompt_field` (a string, a list of chat messages {"role", "content"},
  or a list of token ids). Text goes through the tokenizer's chat template as one user turn, with the generation
  prompt, when the tokenizer folder has a template (a list of messages needs one); otherwise it is tokenized as a
  document is, with data.add_bos. A prompt longer than prompt_len keeps its last prompt_len tokens (the end of a chat
  template is where the assistant's turn opens).
- prefix: a document's first prompt_len tokens (at most all but its last token), as the pipeline tokenizes it.

Random access, no iterator state: prompt i of the run is element i of a Grain MapDataset (each source's training
documents shuffled from the seed, repeated with a fresh shuffle each epoch, mixed by the sources' weights), and
on-policy step k takes the global rows [k·B, (k+1)·B). A resumed run therefore draws exactly the prompts an
uninterrupted one would, from the step number alone; held-out documents are never prompts.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import grain
import numpy as np

from analogjax.data.pipeline import open_sources, source_seed, split_document_ids
from analogjax.data.sources import JsonlSource
from analogjax.data.spec import DataConfig
from analogjax.data.tokenize import configured_specials, encode_document
from analogjax.errors import UserError

# An empty document gives no prefix: the next element stands in, at most this many times in a row.
_MAX_EMPTY_IN_A_ROW = 64
_PROMPT_SEED_SALT = 0x5EED0F


class PromptSet:
    """prompt(i) -> (int32 tokens, 1 <= len <= prompt_len; source id); batch(k, ...) -> host arrays of a step."""

    def __init__(self, data: DataConfig, on_policy, *, seed: int, vocab_size: int):
        self.prompt_len = on_policy.prompt_len
        self.add_bos = data.add_bos
        tokenizer, self.sources = open_sources(data, vocab_size=vocab_size)
        self.tokenizer: Any = tokenizer  # one of data/tokenize.py's tokenizers
        self.vocab_size = vocab_size
        self.field = on_policy.prompt_field
        self.kinds = [self._kind(i, source, on_policy.prompts) for i, source in enumerate(self.sources)]
        self.template = _chat_template(data.tokenizer) if "field" in self.kinds else None
        self._warned_long = False
        streams = []
        for source_id, source in enumerate(self.sources):
            ids, _ = split_document_ids(source, data.heldout_fraction)
            if len(ids) == 0:
                raise UserError(
                    f"data.sources[{source_id}] ({data.sources[source_id].path}): no training documents to draw "
                    "on-policy prompts from"
                )
            refs = np.stack([np.full(len(ids), source_id), ids], axis=1)
            seed_i = source_seed(seed ^ _PROMPT_SEED_SALT, source_id)
            streams.append(grain.MapDataset.source(refs).shuffle(seed=seed_i).repeat(None))
        weights = [s.weight for s in data.sources]
        self._refs = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)

    def _kind(self, source_id: int, source, wanted: str) -> str:
        has_field = isinstance(source, JsonlSource) and self.field in source.record(0)
        if wanted == "field" and not has_field:
            raise UserError(
                f"distill.on_policy.prompts is field, but data.sources[{source_id}] ({source.name}) "
                + (
                    f"has no {self.field!r} key in its first record"
                    if isinstance(source, JsonlSource)
                    else "is not a JSONL source (prompt fields are read from JSONL records)"
                )
                + ": no prompts are available in the data"
            )
        if wanted == "prefix" or not has_field:
            return "prefix"
        return "field"

    def prompt(self, index: int) -> tuple[np.ndarray, int]:
        for attempt in range(_MAX_EMPTY_IN_A_ROW):
            source_id, document = (int(v) for v in self._refs[index + attempt])
            tokens = self._tokens(source_id, document)
            if len(tokens):
                return tokens, source_id
        raise UserError(
            f"{_MAX_EMPTY_IN_A_ROW} documents in a row from prompt {index} on are empty: no prompts are available "
            "in the data"
        )

    def _tokens(self, source_id: int, document: int) -> np.ndarray:
        source = self.sources[source_id]
        if self.kinds[source_id] == "prefix":
            value = source[document]
            if isinstance(value, str):
                tokens = encode_document(self.tokenizer, value, add_bos=self.add_bos, add_eos=False)
            else:
                tokens = np.asarray(value, np.int64)
            # Leave the document at least one token to continue into; a one-token document is its own prompt.
            return self._checked(tokens[: min(self.prompt_len, max(len(tokens) - 1, 1))], source, document)
        assert isinstance(source, JsonlSource)  # _kind gives field prompts to JSONL sources only
        value = source.record(document).get(self.field)
        tokens = self._encode_field(value, source.where(document))
        if len(tokens) > self.prompt_len:
            if not self._warned_long:
                print(
                    f"warning: {source.where(document)}: a prompt of {len(tokens)} tokens is longer than "
                    f"distill.on_policy.prompt_len ({self.prompt_len}): prompts keep their last prompt_len tokens",
                    file=sys.stderr,
                )
                self._warned_long = True
            tokens = tokens[-self.prompt_len :]
        return self._checked(tokens, source, document)

    def _checked(self, tokens: np.ndarray, source, document: int) -> np.ndarray:
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise UserError(f"{source.where(document)}: a prompt token id is outside [0, {self.vocab_size})")
        return tokens.astype(np.int32)

    def _encode_field(self, value, where: str) -> np.ndarray:
        if value is None:
            raise UserError(f"{where}: no key {self.field!r} (distill.on_policy.prompt_field)")
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return np.asarray(value, np.int64)  # token ids, used as given
        if isinstance(value, list):
            if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value):
                raise UserError(f"{where}: {self.field!r} must be text, token ids or chat messages (role, content)")
            if self.template is None:
                raise UserError(f"{where}: chat messages need a chat template, and the tokenizer has none")
            return self._encode_text(self.template.render(value))
        if not isinstance(value, str):
            raise UserError(f"{where}: {self.field!r} must be text, token ids or chat messages, got {value!r:.60}")
        if self.template is not None:
            return self._encode_text(self.template.render([{"role": "user", "content": value}]))
        return encode_document(self.tokenizer, value, add_bos=self.add_bos, add_eos=False)

    def _encode_text(self, text: str) -> np.ndarray:
        # The template writes the specials it wants; nothing is added around it (as transformers tokenizes it).
        return np.asarray(self.tokenizer.encode(text), np.int64)

    def batch(self, k: int, rows: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows of on-policy step k (of `rows` global rows): prompts [r, prompt_len] right-padded
        with the pad id, prompt_lengths [r], source_ids [r]."""
        local = rows // process_count
        prompts = np.full((local, self.prompt_len), self.tokenizer.pad_id, np.int32)
        lengths = np.zeros((local,), np.int32)
        source_ids = np.zeros((local,), np.int32)
        for r in range(local):
            tokens, source_ids[r] = self.prompt(k * rows + process_index * local + r)
            prompts[r, : len(tokens)] = tokens
            lengths[r] = len(tokens)
        return {"prompts": prompts, "prompt_lengths": lengths, "source_ids": source_ids}


class ChatTemplate:
    """A Hugging Face chat template rendered as transformers renders it: Jinja in a sandbox, with the tokenizer's
    bos/eos strings, `add_generation_prompt`, and `raise_exception` for the template's own checks."""

    def __init__(self, source: str, bos_token: str, eos_token: str):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict]) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._specials)
        except TemplateError as exc:
            raise UserError(f"the tokenizer's chat template refused a prompt: {exc}") from None


def _chat_template(tokenizer_spec: str) -> ChatTemplate | None:
    """The chat template next to a HF tokenizer file (tokenizer_config.json or chat_template.jinja), if any."""
    from analogjax.data.tokenizer_files import teacher_chat_template

    if not tokenizer_spec.endswith(".json"):
        return None
    folder = os.path.dirname(os.path.abspath(tokenizer_spec))
    source = teacher_chat_template(folder)
    if source is None:
        return None
    specials = configured_specials(os.path.join(folder, "tokenizer_config.json"))
    return ChatTemplate(source, specials.get("bos_token", ""), specials.get("eos_token", ""))
