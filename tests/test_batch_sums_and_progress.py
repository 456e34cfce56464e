"""The shared pieces every measurement and command uses: sums over batches (float64 on the host, exact whatever the
batching) and the progress display (a bar on a terminal, no redraws in a log)."""

import io

import jax
import jax.numpy as jnp
import numpy as np

from analogjax.runtime.batch_sums import add_sums, sum_over_batches
from analogjax.runtime.metrics_log import Progress


def test_sum_over_batches_adds_nested_sums_in_float64_on_the_host():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(5)]
    scale = jnp.float32(2.0)

    @jax.jit
    def step(scale, x):
        return {"n": jnp.float32(x.shape[0]), "inner": {"sx": scale * x.sum(0), "sxx": x.T @ x}}

    total = sum_over_batches(step, batches, scale)
    expected = {"n": 0.0, "inner": {"sx": 0.0, "sxx": 0.0}}
    for x in batches:  # the reference: each batch's float32 device sums, added in float64
        out = jax.device_get(step(scale, x))
        expected = {
            "n": expected["n"] + np.float64(out["n"]),
            "inner": {k: expected["inner"][k] + np.asarray(out["inner"][k], np.float64) for k in ("sx", "sxx")},
        }
    assert total["n"].dtype == np.float64 and total["inner"]["sxx"].dtype == np.float64
    assert float(total["n"]) == 20.0
    np.testing.assert_array_equal(total["inner"]["sx"], expected["inner"]["sx"])
    np.testing.assert_array_equal(total["inner"]["sxx"], expected["inner"]["sxx"])
    assert sum_over_batches(step, [], scale) == {}
    assert add_sums({}, {"a": np.float32(1.5)})["a"].dtype == np.float64


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_only_for_noted_records_elsewhere():
    log = io.StringIO()
    progress = Progress(3, desc="prepare", unit="doc", enabled=True, stream=log)
    assert list(progress.track(["a", "b", "c"])) == ["a", "b", "c"]
    progress.update(2)
    progress.show(tok_s="10")
    progress.note(3, {"loss": 1.25, "tokens_per_s": 100.0, "other": 1})
    progress.close()
    assert log.getvalue() == "prepare step 3/3 loss 1.25 tokens_per_s 100\n"  # no carriage-return redraws

    terminal = _Terminal()
    progress = Progress(3, desc="prepare", unit="doc", enabled=True, stream=terminal)
    for _ in progress.track(range(3)):
        pass
    progress.close()
    assert "3/3" in terminal.getvalue() and "doc" in terminal.getvalue()

    quiet = _Terminal()
    progress = Progress(3, desc="prepare", enabled=False, stream=quiet)
    progress.update()
    progress.note(1, {"loss": 1.0})
    progress.close()
    assert quiet.getvalue() == ""
