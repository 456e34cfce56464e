"""The public API: every name `analogjax.__all__` promises imports, and the documented round trips hold."""

import subprocess
import sys

import jax
import numpy as np
import pytest

import analogjax


@pytest.mark.parametrize("name", analogjax.__all__)
def test_every_public_name_imports(name):
    value = getattr(analogjax, name)
    assert value is not None
    assert name in dir(analogjax)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        analogjax.not_a_name  # noqa: B018


def test_import_is_light():
    """`import analogjax` must not import JAX (the CLI's --help and prepare's workers stay fast)."""
    code = "import sys, analogjax; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_hf_save_takes_what_load_returns(tmp_path):
    """`hf.save(hf.load(path), out)` round-trips: equal logits from the saved copy."""
    from analogjax import hf
    from analogjax.models.config import ModelConfig
    from analogjax.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    import flax.linen as nn

    params = nn.unbox(Transformer(cfg).init_boxed(jax.random.key(0)))
    hf.save_params(params, cfg, tmp_path / "a", tokenizer="bytes")
    loaded = hf.load(tmp_path / "a")
    hf.save(loaded, tmp_path / "b")
    again = hf.load(tmp_path / "b")
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_allclose(np.asarray(again(tokens)), np.asarray(loaded(tokens)), atol=1e-6)
    assert (tmp_path / "b" / "tokenizer.json").is_file()  # the loaded model's own tokenizer travels with it
    with pytest.raises(analogjax.UserError, match="save_params"):
        hf.save(params, tmp_path / "c")
