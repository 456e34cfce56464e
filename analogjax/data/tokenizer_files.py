"""A run's tokenizer as Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json), so that
`AutoTokenizer.from_pretrained` loads an exported analog with no custom code.

`write_tokenizer` writes a data.tokenizer spec ("bytes" or a HF tokenizers .json) with its special tokens;
`teacher_chat_template` reads a HF teacher folder's chat template and `add_chat_template` adds it to a written
tokenizer, so a chat teacher's analog formats conversations the way its teacher does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from analogjax.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers ≥ 4.43 may keep a chat template instead


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
    """tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast: no custom code). Returns special ids.

    A HF tokenizers file is copied as it is, so its added tokens keep their ids and their `special` flags; the
    config names its bos/eos/pad (and unk, when the model has one) as the analogjax tokenizer resolves them."""
    from analogjax.data.tokenize import load_tokenizer

    ours = load_tokenizer(spec)
    # id_to_token is Optional in the stubs; these ids come from the tokenizer's own vocabulary, so None is not expected.
    names: dict[str, str | None]
    if spec == "bytes":
        byte_tokenizer_json().save(str(out / TOKENIZER_FILE))
        names = dict(zip(("pad_token", "bos_token", "eos_token"), BYTE_SPECIALS))
    elif ours.kind == "hf":
        from tokenizers import Tokenizer

        shutil.copyfile(spec, out / TOKENIZER_FILE)
        tok = Tokenizer.from_file(spec)
        names = {
            key: tok.id_to_token(i)
            for key, i in (("bos_token", ours.bos_id), ("eos_token", ours.eos_id), ("pad_token", ours.pad_id))
            if i is not None
        }
        unk = getattr(tok.model, "unk_token", None)
        if unk and tok.token_to_id(unk) is not None:
            names["unk_token"] = unk
    else:
        raise UserError(f"export: tokenizer {spec!r} ({ours.kind}) cannot be written as a HF tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **names,
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")
    return {"bos_token_id": ours.bos_id, "eos_token_id": ours.eos_id, "pad_token_id": ours.pad_id}


def teacher_chat_template(folder: str | Path | None) -> str | None:
    """The chat template of a HF model folder (tokenizer_config.json's chat_template, else chat_template.jinja);
    None when it has none. A list of named templates is refused rather than half copied."""
    if not folder or not Path(folder).is_dir():
        return None
    folder = Path(folder)
    config_file = folder / TOKENIZER_CONFIG_FILE
    template = None
    if config_file.is_file():
        try:
            template = json.loads(config_file.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{config_file}: not a JSON object") from None
    if template is None and (folder / CHAT_TEMPLATE_FILE).is_file():
        template = (folder / CHAT_TEMPLATE_FILE).read_text()
    if template is not None and not isinstance(template, str):
        raise UserError(
            f"{config_file}: chat_template is a list of named templates; only a single template is "
            "carried into the analog's tokenizer"
        )
    return template


def add_chat_template(out: Path, template: str) -> None:
    """Add a chat template to the tokenizer_config.json that `write_tokenizer` wrote in `out`."""
    config_file = Path(out) / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["chat_template"] = template
    config_file.write_text(json.dumps(config, indent=2) + "\n")
