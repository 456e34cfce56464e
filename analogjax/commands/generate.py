"""`analogjax generate (--checkpoint DIR [--config FILE] | --hf PATH) --prompt TEXT [--prompt TEXT ...]
[--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json] [--chat]`: continue prompts.

A prompt is tokenized as the model's own tokenizer does by itself: for a Hugging Face folder, as a transformers
tokenizer call does (its own BOS/EOS via its post-processor; `--chat` applies its chat template first); for an
analogjax run, the run's tokenizer (data.tokenizer, or the prepared shards') with the run's add_bos. Decoding stops
at the tokenizer's EOS (and the model's generation_config/config EOS ids for a HF folder), at --max-new-tokens,
or at the model's context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, cast

from analogjax.commands import add_job_arguments, join_job
from analogjax.errors import UserError

if TYPE_CHECKING:  # transformers is optional at run time
    from transformers import PreTrainedTokenizerBase


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run's workdir or its checkpoints directory (its student)")
    source.add_argument("--hf", help="a Hugging Face model folder")
    parser.add_argument("--config", help="with --checkpoint: a config replacing the run's own (same model)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt, used as given (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the smallest set of mass p (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, completion, tokens")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template (HF)")
    add_job_arguments(parser)


class _HFText:
    """A HF folder's tokenizer as transformers would call it (tokenizers' own post-processor without it)."""

    def __init__(self, path: Path, chat: bool):
        self.chat = chat
        self._tok: PreTrainedTokenizerBase | None  # None: transformers is absent, so tokenizers' file is used raw
        try:
            import transformers

            self._tok = transformers.AutoTokenizer.from_pretrained(str(path))
        except ImportError:
            if chat:
                raise UserError(
                    "--chat needs the transformers package (chat templates are Jinja in tokenizer_config.json)"
                ) from None
            if not (path / "tokenizer.json").is_file():
                raise UserError(f"{path} has no tokenizer.json") from None
            from tokenizers import Tokenizer

            self._tok = None
            self._raw = Tokenizer.from_file(str(path / "tokenizer.json"))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: no usable tokenizer ({e})") from None
        if chat and not getattr(self._tok, "chat_template", None):
            raise UserError(f"--chat: the tokenizer of {path} has no chat template")
        eos = None if self._tok is None else self._tok.eos_token_id
        self.eos_ids = [eos] if eos is not None else []

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            return self._raw.encode(text, add_special_tokens=True).ids
        if self.chat:
            return list(
                self._tok.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=False
                )
            )
        return list(self._tok(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        if self._tok is None:
            return self._raw.decode(ids, skip_special_tokens=True)
        # decode is typed str | list[str] (a list of id lists decodes to a list); one id list decodes to one str.
        return cast(str, self._tok.decode(ids, skip_special_tokens=True))


class _RunText:
    """An analogjax run's data.tokenizer, with the run's BOS setting."""

    def __init__(self, data):
        from analogjax.data.tokenize import load_tokenizer, resolve_tokenizer

        spec = resolve_tokenizer(data)  # data.tokenizer, or for "none" the one the prepared shards recorded
        if spec == "none":
            raise UserError(
                "the run's data.tokenizer is none and its sources name no tokenizer: prompts are text, "
                "so there is nothing to tokenize them with"
            )
        self._tok = load_tokenizer(spec)
        self.add_bos = data.add_bos
        if self.add_bos and getattr(self._tok, "bos_id", None) is None:
            raise UserError(f"data.add_bos is set but {spec} has no BOS token")
        eos = getattr(self._tok, "eos_id", None)
        self.eos_ids = [eos] if eos is not None else []

    def encode(self, text: str) -> list[int]:
        return ([self._tok.bos_id] if self.add_bos else []) + list(self._tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in self.eos_ids])


def _hf_eos_and_context(path: Path) -> tuple[list[int], int | None]:
    ids: list[int] = []
    context = None
    for name in ("config.json", "generation_config.json"):
        file = path / name
        if not file.is_file():
            continue
        raw = json.loads(file.read_text())
        eos = raw.get("eos_token_id")
        ids += [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
        if name == "config.json":
            context = raw.get("max_position_embeddings") or raw.get("text_config", {}).get("max_position_embeddings")
    return ids, context


def load(args):
    """(Model, text codec, EOS ids, context length) for the command's model source."""
    from analogjax import mesh as mesh_lib
    from analogjax.models.model import Model

    if args.hf:
        from analogjax.models import hf

        path = Path(args.hf)
        if args.config:
            raise UserError("--config goes with --checkpoint, not --hf")
        model = hf.load(path)
        text = _HFText(path, args.chat)
        eos, context = _hf_eos_and_context(path)
        return model, text, sorted(set(eos + text.eos_ids)), context
    from analogjax.config import load_config
    from analogjax.run_dir import load_student

    if args.chat:
        raise UserError("--chat needs a tokenizer with a chat template: use --hf with a Hugging Face folder")
    config = load_config(args.config, []) if args.config else None
    config, _, _, mesh, params = load_student(args.checkpoint, config)
    model = Model(config.model, params, mesh=mesh, rules=mesh_lib.STUDENT_RULES, tokenizer=config.data.tokenizer)
    text = _RunText(config.data)
    # The student was trained on sequences of data.seq_len tokens: its context.
    return model, text, text.eos_ids, config.data.seq_len


def run(args) -> int:
    from analogjax.models.sampling import Sampling, check_request, generate

    options = Sampling(args.temperature, args.top_k, args.top_p)
    options.check()  # before loading anything: a bad option costs no model load
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    join_job(args)
    model, text, eos_ids, context = load(args)
    prompts = [text.encode(p) for p in args.prompt]
    check_request(prompts, args.max_new_tokens, options, context, model.config.vocab_size)
    completions = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_ids=eos_ids,
        max_positions=context,
    )
    for prompt, tokens in zip(args.prompt, completions):
        completion = text.decode(tokens)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion, "tokens": tokens}))
        else:
            print(prompt + completion)
    return 0
