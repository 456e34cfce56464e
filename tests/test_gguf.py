"""GGUF teachers against transformers' own GGUF loading: tiny random Llamas written with the gguf package's writer.

Each file is written the way llama.cpp's converter writes one (q/k rows permuted, 1-D tensors F32, the rest in the
tested type), loaded by analogjax and by `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which
dequantizes too; logits must agree to 1e-4 of the largest logit. The tokenizer rebuilt from the metadata must
tokenize like transformers' GGUF tokenizer. Bad files give one `error:` line and exit 2 through the CLI.
"""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from test_cli import analogjax, assert_user_error  # noqa: E402

from analogjax.data.tokenize import load_tokenizer  # noqa: E402
from analogjax.errors import UserError  # noqa: E402
from analogjax.models import gguf as gguf_lib  # noqa: E402

TEXTS = [
    "def read_file(path):\n    with open(path) as f:\n        return f.read()\n",
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 12345 things!",
    "import os\nimport sys\n\nclass Reader:\n    pass\n",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HEADS, KV_HEADS, D_MODEL = 4, 2, 64
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bpe():
    return make_bpe()


@pytest.fixture(scope="module")
def hf_llama(bpe):
    return make_hf_llama(bpe)


def make_bpe():
    """A real byte-level BPE (ids 0..2 are control tokens), trained on a few lines: its vocab and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def make_hf_llama(bpe):
    """A tiny random Llama over `bpe`'s vocabulary, every tensor perturbed."""
    tokens, _ = bpe
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=D_MODEL,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # fresh norms are exactly 1: perturb everything so each tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _permute(w, heads):
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (rotate-half → interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, bpe, qtype: str, *, arch="llama", tied=False, pre="gpt2", extra=None):
    tokens, merges = bpe
    cfg = model.config
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}.get(qtype, 0))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_string(key, value)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, value in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        w = value.float().numpy()
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{per_layer['.'.join(rest[:-1])]}.weight"
        else:
            gname = names[name]
        if gname.endswith("attn_q.weight"):
            w = _permute(w, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            w = _permute(w, cfg.num_key_value_heads)
        if w.ndim == 1 or qtype == "F32":
            writer.add_tensor(gname, np.ascontiguousarray(w, np.float32))
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qt)
            writer.add_tensor(gname, data, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _transformers_logits(folder, name, toks):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(toks, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize(
    "qtype,tied", [("F32", False), ("F16", True), ("BF16", False), ("Q8_0", True), ("Q4_0", False), ("Q4_1", True)]
)
def test_logits_match_transformers_gguf_loading(qtype, tied, tmp_path, bpe, hf_llama):
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", hf_llama, bpe, qtype, tied=tied)
    cfg = gguf_lib.model_config_from_gguf(path)
    assert cfg.tie_embeddings == tied and cfg.n_kv_heads == KV_HEADS and cfg.vocab_size == len(bpe[0])
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    ours = np.asarray(gguf_lib.load(path)(toks))
    theirs = _transformers_logits(tmp_path, path.name, toks)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale, rtol=0)
    if qtype == "F32" and not tied:  # unquantized: the HF model itself, so the permutation is undone exactly
        with torch.no_grad():
            reference = hf_llama(torch.as_tensor(toks, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(ours, reference, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_tokenizer_matches_transformers(pre, tmp_path, bpe, hf_llama):
    path = write_gguf(tmp_path / "tok.gguf", hf_llama, bpe, "F32", pre=pre)
    out = gguf_lib.write_tokenizer(path, tmp_path / "tok")
    ours = load_tokenizer(str(out))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)
    assert ours.vocab_size == len(bpe[0])
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>", "  spaces\t\tand\n\n\nnewlines ünïcödé"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text


def test_smollm_pre_tokenizer_splits_digits(tmp_path, bpe, hf_llama):
    # llama.cpp's "smollm" (StarCoder's) splits every digit before the byte-level regex.
    path = write_gguf(tmp_path / "tok.gguf", hf_llama, bpe, "F32", pre="smollm")
    tok, _ = gguf_lib.tokenizer_from_gguf(path)
    assert [t for t in tok.encode("x 12345", add_special_tokens=False).tokens if t.strip("Ġ")][-5:] == list("12345")


def test_provenance_names_file_and_quantisation(tmp_path, bpe, hf_llama):
    import hashlib

    path = write_gguf(tmp_path / "p.gguf", hf_llama, bpe, "Q4_1")
    prov = gguf_lib.gguf_provenance(path)
    assert prov["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["name"] == "tiny-llama" and prov["file_type"] == "Q4_1" and prov["tensor_types"]["Q4_1"] == 2 * 7 + 2


def test_unsupported_metadata_is_refused(tmp_path, bpe, hf_llama):
    path = write_gguf(tmp_path / "r.gguf", hf_llama, bpe, "F32", extra={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(UserError, match="RoPE scaling 'yarn'"):
        gguf_lib.model_config_from_gguf(path)
    path = write_gguf(tmp_path / "s.gguf", hf_llama, bpe, "F32", extra={"llama.attention.sliding_window": 8})
    with pytest.raises(UserError, match="sliding_window"):
        gguf_lib.model_config_from_gguf(path)


def _distill(tmp_path, gguf_path):
    return analogjax(
        "distill",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--workdir",
        str(tmp_path / "run"),
        "--no-progress",
        "--set",
        f"teacher.gguf_path={gguf_path}",
        "--set",
        "model.vocab_size=320",
        "--set",
        "train.steps=1",
        timeout=120,
    )


def test_cli_refuses_bad_gguf_files(tmp_path, bpe, hf_llama):
    good = write_gguf(tmp_path / "good.gguf", hf_llama, bpe, "F32")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])
    assert_user_error(_distill(tmp_path, truncated), "truncated.gguf", "truncated", "download or convert it again")
    falcon = write_gguf(tmp_path / "falcon.gguf", hf_llama, bpe, "F32", arch="falcon")
    assert_user_error(_distill(tmp_path, falcon), "falcon.gguf", "unsupported GGUF architecture 'falcon'")
    q5 = write_gguf(tmp_path / "q5.gguf", hf_llama, bpe, "Q5_0")
    assert_user_error(_distill(tmp_path, q5), "q5.gguf", "type Q5_0", "requantize")
