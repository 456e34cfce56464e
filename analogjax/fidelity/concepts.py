"""Token-level binary concepts for the transfer checks (analogjax.fidelity.transfer): where a concept holds in a
text, as character spans, and from those spans a label per token.

Built in, computed from the text alone so they need no labels:
- Python source, from the standard library's own `tokenize`: `python_string` (inside a string literal, f-strings
  included), `python_comment`, `python_keyword` (a NAME for which keyword.iskeyword is true), `python_number`.
  A text that is not Python (ast.parse refuses it: prose, a cut part of a file) is unlabelled for these four, not
  negative: English "if" and "in" are no Python keywords.
- Any text: `in_brackets` (the characters between an opening (, [ or { and its closing one, brackets excluded,
  nesting counted over all three kinds) and `digit` (an ASCII digit 0-9).
A lab adds its own as JSONL lines {"concept": NAME, "text": ..., "spans": [[start, end], ...]} (character offsets
into the text, end exclusive); every other token of its texts is a negative.

A token is positive when its character span overlaps a concept span by at least one character ("touches the
concept"; majority-of-characters would call " 1" not a digit, since the space counts). Tokens that cover no
character (begin/end-of-text specials) are unlabelled. Labels: 1 positive, 0 negative, -1 unlabelled.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import token
import tokenize
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from analogjax.errors import UserError

PYTHON_CONCEPTS = ("python_string", "python_comment", "python_keyword", "python_number")
TEXT_CONCEPTS = ("in_brackets", "digit")
BUILTIN_CONCEPTS = PYTHON_CONCEPTS + TEXT_CONCEPTS
_STRING_TYPES = {token.STRING} | {
    getattr(token, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(token, n)
}
_OPEN, _CLOSE = "([{", ")]}"
_USER_FIELDS = ("concept", "text", "spans")


class UserConcept(NamedTuple):
    """One JSONL line: a text and where the concept holds in it."""

    concept: str
    text: str
    spans: tuple[tuple[int, int], ...]


# ----------------------------------------------------------------------------------------------------------------
# Character spans of the built-in concepts


def python_spans(text: str) -> dict[str, list[tuple[int, int]]] | None:
    """Spans of the four Python concepts, or None when the text is not Python."""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a null byte
        return None
    line_starts = [0]
    for line in io.StringIO(text).readlines():
        line_starts.append(line_starts[-1] + len(line))
    spans: dict[str, list[tuple[int, int]]] = {name: [] for name in PYTHON_CONCEPTS}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            start = line_starts[tok.start[0] - 1] + tok.start[1]
            end = line_starts[tok.end[0] - 1] + tok.end[1]
            if tok.type in _STRING_TYPES:
                spans["python_string"].append((start, end))
            elif tok.type == token.COMMENT:
                spans["python_comment"].append((start, end))
            elif tok.type == token.NUMBER:
                spans["python_number"].append((start, end))
            elif tok.type == token.NAME and keyword.iskeyword(tok.string):
                spans["python_keyword"].append((start, end))
    except (tokenize.TokenError, SyntaxError, IndexError):  # IndentationError is a SyntaxError
        return None
    return spans


def text_spans(text: str) -> dict[str, list[tuple[int, int]]]:
    """Spans of the concepts that hold for any text: inside brackets, and digits."""
    inside, digits = [], []
    depth, start = 0, 0
    for k, char in enumerate(text):
        if char in _OPEN:
            if depth == 0:
                start = k + 1
            depth += 1
        elif char in _CLOSE and depth > 0:
            depth -= 1
            if depth == 0 and k > start:
                inside.append((start, k))
        if "0" <= char <= "9":
            digits.append((k, k + 1))
    if depth > 0 and len(text) > start:  # an unclosed bracket: inside until the text ends
        inside.append((start, len(text)))
    return {"in_brackets": inside, "digit": digits}


# ----------------------------------------------------------------------------------------------------------------
# Tokens with character offsets, and labels from spans


def encode_with_offsets(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ids [n], int64 character offsets [n, 2]) of a text, the ids exactly as the data pipeline encodes it."""
    if tokenizer.kind == "bytes":
        encoded = text.encode("utf-8")
        char_of_byte = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
        offsets = np.stack([char_of_byte, char_of_byte + 1], axis=1) if len(text) else np.zeros((0, 2), np.int64)
        return np.frombuffer(encoded, np.uint8).astype(np.int32), offsets.astype(np.int64)
    if tokenizer.kind == "hf":
        encoding = _hf_tokenizer(tokenizer.path).encode(text, add_special_tokens=False)
        return (np.asarray(encoding.ids, np.int32), np.asarray(encoding.offsets, np.int64).reshape(-1, 2))
    raise UserError(
        f"a {tokenizer.kind} tokenizer gives no character offsets: token-level concepts cannot be "
        "labelled (use a HF tokenizers JSON file or bytes)"
    )


_HF_CACHE: dict = {}


def _hf_tokenizer(path: str):
    from tokenizers import Tokenizer

    if path not in _HF_CACHE:
        _HF_CACHE[path] = Tokenizer.from_file(path)
    return _HF_CACHE[path]


def labels_from_spans(offsets_n2: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """int8 [n]: 1 where a token's characters overlap any span, 0 elsewhere, -1 for tokens that cover no character."""
    offsets_n2 = np.asarray(offsets_n2, np.int64).reshape(-1, 2)
    starts, ends = offsets_n2[:, 0], offsets_n2[:, 1]
    labels = np.zeros(len(offsets_n2), np.int8)
    if spans:
        span_arr = np.asarray(sorted(spans), np.int64).reshape(-1, 2)
        # Overlap of [a, b) with [s, e): a < e and s < b. Spans sorted by start: the last span starting before b
        # is the only candidate once spans are merged, so merge them first.
        merged = [list(span_arr[0])]
        for s, e in span_arr[1:]:
            if s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        merged_arr = np.asarray(merged, np.int64)
        last = np.searchsorted(merged_arr[:, 0], ends, side="left") - 1
        candidate = np.clip(last, 0, None)
        labels[(last >= 0) & (starts < merged_arr[candidate, 1])] = 1
    labels[ends <= starts] = -1
    return labels


def builtin_labels(text: str, offsets_n2: np.ndarray) -> dict[str, np.ndarray]:
    """Labels of every built-in concept for one text's tokens (Python ones all -1 when the text is not Python)."""
    spans = text_spans(text)
    python = python_spans(text)
    out = {name: labels_from_spans(offsets_n2, s) for name, s in spans.items()}
    for name in PYTHON_CONCEPTS:
        out[name] = (
            labels_from_spans(offsets_n2, python[name]) if python is not None else np.full(len(offsets_n2), -1, np.int8)
        )
    return {name: out[name] for name in BUILTIN_CONCEPTS}


# ----------------------------------------------------------------------------------------------------------------
# User concepts (JSONL)


def read_user_concepts(path: str | Path) -> list[UserConcept]:
    """The lines of a concepts JSONL file, each checked: exactly the fields concept, text and spans; spans inside
    the text; a name that is not a built-in one. Any fault is a UserError naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--concepts: no such file {path}")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not a JSON object ({e})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: not a JSON object")
        unknown = sorted(set(record) - set(_USER_FIELDS))
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)} (expected {', '.join(_USER_FIELDS)})")
        missing = [f for f in _USER_FIELDS if f not in record]
        if missing:
            raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
        name, text, spans = record["concept"], record["text"], record["spans"]
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: concept must be a non-empty string")
        if name in BUILTIN_CONCEPTS:
            raise UserError(f"{where}: concept {name!r} is the name of a built-in concept: choose another")
        if not isinstance(text, str) or not text:
            raise UserError(f"{where}: text must be a non-empty string")
        if not isinstance(spans, list):
            raise UserError(f"{where}: spans must be a list of [start, end] pairs")
        checked = []
        for span in spans:
            if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)):
                raise UserError(f"{where}: span {span!r} is not a [start, end] pair of integers")
            start, end = span
            if not 0 <= start < end <= len(text):
                raise UserError(
                    f"{where}: span [{start}, {end}] is not inside the text ({len(text)} characters; "
                    "0 <= start < end <= length)"
                )
            checked.append((start, end))
        out.append(UserConcept(name, text, tuple(checked)))
    if not out:
        raise UserError(f"--concepts: {path} holds no concept lines")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Labelled token rows from held-out documents (what analogjax.fidelity.transfer measures on)

# A long document gives at most this many rows (more only when the held-out documents are too few to fill the rows
# asked for), so the rows come from many documents and both parts of the split.
MAX_ROWS_PER_DOCUMENT = 2
# Marker tokens per concept for the steering check: those most over-represented right after the concept.
MARKERS = 3


class LabelledRows(NamedTuple):
    """Rows of one document chunk each ([R, s]; padding has segment id 0), a fit/eval part per row, and labels."""

    tokens: np.ndarray  # int32 [R, s]
    segment_ids: np.ndarray  # int32 [R, s]
    positions: np.ndarray  # int32 [R, s]
    targets: np.ndarray  # int32 [R, s]: the next token in the chunk
    loss_mask: np.ndarray  # float32 [R, s]: 1 where a next token exists
    fit: np.ndarray  # bool [R]: the row's document is in the fit part (else the eval part)
    labels: np.ndarray  # int8 [R, s, C]
    document_ids: np.ndarray  # int64 [R]: the row's document (held-out document k is k; user concept texts follow)
    concepts: tuple[str, ...]
    unlabelled_reason: str | None  # why the built-in concepts could not be labelled (no text, no offsets)
    documents: dict[str, int]  # held-out documents read, by part


def heldout_texts(data, vocab_size: int):
    """(tokenizer, number of documents, iterator of (text or None, token ids or None)): the held-out documents of
    every source, taken round-robin over the sources in each source's held-out order (split_document_ids)."""
    from analogjax.data.pipeline import open_sources, split_document_ids
    from analogjax.data.sources import TextFilesSource

    tokenizer, sources = open_sources(data, vocab_size=vocab_size)
    heldout = [split_document_ids(source, data.heldout_fraction)[1] for source in sources]

    def documents():
        for k in range(max((len(ids) for ids in heldout), default=0)):
            for source, ids in zip(sources, heldout):
                if k < len(ids):
                    index = int(ids[k])
                    # A text-files source may answer with cached token ids: read the text itself for its offsets.
                    value = (
                        source.read_text(*source.locate(index))
                        if isinstance(source, TextFilesSource)
                        else source[index]
                    )
                    yield (value, None) if isinstance(value, str) else (None, np.asarray(value, np.int32))

    return tokenizer, sum(len(ids) for ids in heldout), documents()


def select(rows: LabelledRows, keep) -> LabelledRows:
    """The rows `keep` picks (a mask, or indices in the order wanted)."""
    arrays = ("tokens", "segment_ids", "positions", "targets", "loss_mask", "fit", "labels", "document_ids")
    return rows._replace(**{f: getattr(rows, f)[keep] for f in arrays})


def round_robin(document: np.ndarray) -> np.ndarray:
    """The order taking rows round-robin over their documents: each document's first row (documents in order of
    first appearance), then each one's second, ...; a document's rows keep their order."""
    _, first, which = np.unique(np.asarray(document), return_index=True, return_inverse=True)
    which = which.reshape(-1)
    by_document = np.argsort(which, kind="stable")
    starts = np.searchsorted(which[by_document], which[by_document])  # where each row's document begins there
    rank = np.empty(len(which), np.int64)  # a row's place among its document's rows
    rank[by_document] = np.arange(len(which)) - starts
    return np.lexsort((first[which], rank))


def part_batches(batches: int | None, part: int | None) -> int:
    """A transfer check's fit or eval batches: `part` where given, else half of `batches` rounded up."""
    return int(part) if part is not None else -(-int(batches or 0) // 2)


def rows_for_budgets(config, batches, fit_batches, eval_batches, user: Sequence[UserConcept] = ()) -> LabelledRows:
    """The labelled rows a transfer check's budgets need (global batches of config.data): `fit_batches` and
    `eval_batches`, a missing one half of `batches` rounded up, or `batches` alone (documents alternating fit and
    eval)."""
    gb = config.data.global_batch
    if fit_batches is None and eval_batches is None:
        return labelled_rows(config.data, config.model.vocab_size, rows=int(batches or 0) * gb, user=user)
    return labelled_rows(
        config.data,
        config.model.vocab_size,
        fit_rows=part_batches(batches, fit_batches) * gb,
        eval_rows=part_batches(batches, eval_batches) * gb,
        user=user,
    )


def labelled_rows(
    data,
    vocab_size: int,
    *,
    rows: int | None = None,
    fit_rows: int | None = None,
    eval_rows: int | None = None,
    user: Sequence[UserConcept] = (),
) -> LabelledRows:
    """Rows of held-out documents (document k in the fit part when k is even, else the eval part) labelled with the
    built-in concepts, then one row per chunk of each user concept text (a concept's texts alternate fit, eval, fit,
    ... in file order) labelled with that concept only.

    Either `rows` in all (each part gets what its documents give, about half), or `fit_rows` and `eval_rows`, a
    budget per part: documents are read until both parts are full (no further document is tokenized), and a part
    the held-out documents cannot fill is a UserError naming its budget."""
    split = fit_rows is not None or eval_rows is not None
    if split and (fit_rows is None or eval_rows is None or rows is not None):
        raise ValueError("labelled_rows takes rows, or fit_rows and eval_rows")
    if not split and rows is None:
        raise ValueError("labelled_rows needs rows, or fit_rows and eval_rows")
    tokenizer, count, documents = heldout_texts(data, vocab_size)
    if split:
        wanted = {"fit": int(fit_rows or 0), "eval": int(eval_rows or 0)}
        # Few held-out documents: take more rows from each, so the rows asked for are still filled.
        per_document = {
            part: max(MAX_ROWS_PER_DOCUMENT, -(-n // max((count + (part == "fit")) // 2, 1)))
            for part, n in wanted.items()
        }
    else:
        total = int(rows or 0)
        per_document = dict.fromkeys(("fit", "eval"), max(MAX_ROWS_PER_DOCUMENT, -(-total // max(count, 1))))
    user_names = tuple(dict.fromkeys(u.concept for u in user))
    names = BUILTIN_CONCEPTS + user_names
    column = {name: c for c, name in enumerate(names)}
    builder = _RowBuilder(data, tokenizer, len(names))
    reason = None
    counts = {"fit": 0, "eval": 0}
    filled = {"fit": 0, "eval": 0}
    for k, (text, ids) in enumerate(documents):
        part = "fit" if k % 2 == 0 else "eval"
        if split:
            if all(filled[p] >= wanted[p] for p in filled):
                break
            room = wanted[part] - filled[part]
            if room <= 0:
                continue  # this part is full: its documents are not even tokenized
        else:
            room = total - len(builder.rows)
            if room <= 0:
                break
        labels = {}
        if text is not None:
            try:
                ids, offsets = encode_with_offsets(tokenizer, text)
                labels = builtin_labels(text, offsets)
            except UserError as e:  # no offsets: the texts still serve the stitching maps, unlabelled
                ids, reason = tokenizer.encode_array(text), str(e)
        else:
            reason = "the held-out documents are token ids without their text"
        counts[part] += 1
        before = len(builder.rows)
        builder.add(
            ids,
            {column[n]: v for n, v in labels.items()},
            fit=part == "fit",
            limit=min(per_document[part], room),
            document=k,
        )
        filled[part] += len(builder.rows) - before
    if not builder.rows:
        raise UserError("the held-out split gave no documents: raise data.heldout_fraction or add documents")
    if split:
        for part, flag in (("fit", "fit_batches (--fit-batches)"), ("eval", "eval_batches (--eval-batches)")):
            if filled[part] < wanted[part]:
                raise UserError(
                    f"transfer {flag}: {wanted[part] // data.global_batch} batch(es) of {data.global_batch} rows "
                    f"ask for {wanted[part]} rows of the {part} half of the held-out documents, which "
                    f"gave {filled[part]} ({count} held-out documents in all): raise data.heldout_fraction, "
                    f"add documents or ask for fewer {part} batches"
                )
    seen: dict[str, int] = {}
    for t, concept in enumerate(user):
        ids, offsets = encode_with_offsets(tokenizer, concept.text)
        k = seen[concept.concept] = seen.get(concept.concept, -1) + 1
        builder.add(
            ids,
            {column[concept.concept]: labels_from_spans(offsets, concept.spans)},
            fit=k % 2 == 0,
            limit=None,
            document=count + t,
        )
    return LabelledRows(*builder.arrays(), concepts=names, unlabelled_reason=reason, documents=counts)


class _RowBuilder:
    def __init__(self, data, tokenizer, n_concepts: int):
        self.seq_len = data.seq_len
        self.head = [tokenizer.bos_id] if data.add_bos else []
        self.tail = [tokenizer.eos_id] if data.add_eos else []
        self.pad_id = tokenizer.pad_id
        self.n_concepts = n_concepts
        self.rows: list[tuple[np.ndarray, np.ndarray, bool, int]] = []

    def add(
        self, ids: np.ndarray, labels: dict[int, np.ndarray], *, fit: bool, limit: int | None, document: int
    ) -> None:
        ids = np.concatenate(
            [np.asarray(self.head, np.int32), np.asarray(ids, np.int32), np.asarray(self.tail, np.int32)]
        )
        table = np.full((len(ids), self.n_concepts), -1, np.int8)  # specials stay unlabelled
        for c, values in labels.items():
            table[len(self.head) : len(ids) - len(self.tail), c] = values
        for start in range(0, len(ids), self.seq_len)[:limit]:
            if len(ids) - start >= 2:  # a row needs a next token to predict
                self.rows.append(
                    (ids[start : start + self.seq_len], table[start : start + self.seq_len], fit, document)
                )

    def arrays(
        self,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """LabelledRows' array fields, in their order."""
        r, s = len(self.rows), self.seq_len
        tokens = np.full((r, s), self.pad_id, np.int32)
        segment_ids = np.zeros((r, s), np.int32)
        labels = np.full((r, s, self.n_concepts), -1, np.int8)
        for k, (ids, table, _, _) in enumerate(self.rows):
            tokens[k, : len(ids)], segment_ids[k, : len(ids)], labels[k, : len(ids)] = ids, 1, table
        positions = np.where(segment_ids > 0, np.arange(s, dtype=np.int32), 0).astype(np.int32)
        targets = np.full_like(tokens, self.pad_id)
        targets[:, :-1] = tokens[:, 1:]
        loss_mask = np.zeros((r, s), np.float32)
        loss_mask[:, :-1] = segment_ids[:, 1:] > 0
        fit = np.asarray([f for _, _, f, _ in self.rows], bool)
        document = np.asarray([d for _, _, _, d in self.rows], np.int64)
        return tokens, segment_ids, positions, targets, loss_mask, fit, labels, document


def marker_tokens(tokens_rs, targets_rs, mask_rs, labels_rs, k: int = MARKERS) -> list[int]:
    """The k tokens whose rate right after positive tokens most exceeds their rate after negative ones (if > 0)."""
    after_pos = targets_rs[(labels_rs == 1) & (mask_rs > 0)]
    after_neg = targets_rs[(labels_rs == 0) & (mask_rs > 0)]
    if not len(after_pos) or not len(after_neg):
        return []
    size = int(max(tokens_rs.max(), targets_rs.max())) + 1
    excess = np.bincount(after_pos, minlength=size) / len(after_pos) - np.bincount(after_neg, minlength=size) / len(
        after_neg
    )
    order = np.argsort(-excess, kind="stable")[:k]
    return [int(t) for t in order if excess[t] > 0]


def measurable(rows: LabelledRows, user_names) -> tuple[list[int], list[list[int]], list[dict]]:
    """Concept columns to measure, their marker tokens, and the built-in ones skipped with the reason."""
    measured, markers, skipped = [], [], []
    for c, name in enumerate(rows.concepts):
        labels = rows.labels[..., c]
        reason = None
        for part, in_part in (("fit", rows.fit), ("eval", ~rows.fit)):
            for kind, value in (("positive", 1), ("negative", 0)):
                if reason is None and not np.any(labels[in_part] == value):
                    reason = f"no {kind} tokens in the {part} part of its texts"
        found = (
            []
            if reason
            else marker_tokens(
                rows.tokens[rows.fit], rows.targets[rows.fit], rows.loss_mask[rows.fit], labels[rows.fit]
            )
        )
        if reason is None and not found:
            reason = "no token follows its positions more often than other positions (no marker tokens)"
        if reason is None:
            measured.append(c)
            markers.append(found)
        elif name in user_names:
            raise UserError(
                f"concept {name!r} cannot be measured: {reason} (its texts alternate fit, eval, fit, ... "
                "in file order: give at least two, each with tokens inside and outside the concept)"
            )
        elif name in BUILTIN_CONCEPTS:
            if not np.any(labels >= 0):  # nothing labelled at all: say why rather than "no positive tokens"
                reason = rows.unlabelled_reason or (
                    "no held-out document parses as Python" if name in PYTHON_CONCEPTS else "no held-out text"
                )
            skipped.append({"concept": name, "reason": reason})
    return measured, markers, skipped
