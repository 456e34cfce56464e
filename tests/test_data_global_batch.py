"""to_global_batch: host-local numpy rows become one jax.Array per key, laid out by the given sharding."""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from analogjax.data import to_global_batch


def _mesh():
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)


def _batch(rows=8, seq=16):
    rng = np.random.default_rng(0)
    return {
        "tokens": rng.integers(0, 259, (rows, seq)).astype(np.int32),
        "segment_ids": np.ones((rows, seq), np.int32),
        "loss_mask": rng.random((rows, seq)).astype(np.float32),
    }


def test_one_sharding_for_every_key():
    sharding = NamedSharding(_mesh(), P(("data", "fsdp"), None))
    batch = _batch()
    out = to_global_batch(batch, sharding)
    assert set(out) == set(batch)
    for key, value in out.items():
        assert isinstance(value, jax.Array) and value.sharding == sharding
        assert value.dtype == batch[key].dtype and value.shape == batch[key].shape
        np.testing.assert_array_equal(np.asarray(value), batch[key])
        # Each of the 4 data-parallel groups holds 2 rows.
        assert {s.data.shape for s in value.addressable_shards} == {(2, 16)}


def test_a_sharding_per_key():
    mesh = _mesh()
    shardings = {
        "tokens": NamedSharding(mesh, P("data", None)),
        "segment_ids": NamedSharding(mesh, P()),
        "loss_mask": NamedSharding(mesh, P(("data", "fsdp"), "tensor")),
    }
    out = to_global_batch(_batch(), shardings)
    for key, value in out.items():
        assert value.sharding == shardings[key]
