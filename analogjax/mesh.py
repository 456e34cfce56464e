"""The device mesh, the logical-axis rules, and born-sharded parameters.

The rule tables below are the only place where physical mesh axes are named. Models name logical axes
(`embed`, `mlp`, `heads`, ...); the rules map them to `data`, `fsdp`, `context`, `tensor`.

Why a `context` axis (size 1 unless `mesh.context` asks for more) rather than reusing one: long-context (32k-128k)
distillation splits each sequence over chips, and inside attention the queries must stay split by position while
the heads stay split over `tensor` — two splits at once, so `tensor` cannot also carry the sequence. `data` and
`fsdp` split the batch's rows; carrying the sequence on them instead would make the rule tables depend on the run
(batch → data only, length → fsdp) for both roles, and at 32k there are often fewer rows than data x fsdp anyway,
which is exactly when the sequence needs its own split. At size 1 the axis changes nothing.
How attention crosses it: all-gathered keys and values (models/attention.py `gather_context`), not a ring. Per chip
that holds [b, s, kv_heads/tensor, e] keys and values for one layer at a time (Llama-3.1-8B at 32k: 64 MiB each
per row in bfloat16), while queries, scores, MLP and every saved activation stay split s/context ways; the gather is one
collective per layer that XLA overlaps with the projections. A ring would save that gather's memory at the price of
context-many permute rounds per layer; it is the next step if 128k+ on small kv-head counts runs short.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from analogjax.errors import UserError

AXES = ("data", "fsdp", "context", "tensor")  # tensor innermost: its groups are interconnect neighbours
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: fsdp is data parallelism with sharded weights

# Activations (shared by both models). The sequence splits over `context` (size 1 unless long context asks), width
# stays whole; heads, ffn and vocab follow the tensor axis.
_ACTIVATION_RULES = (
    ("batch", BATCH_AXES),
    ("length", "context"),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)

# Experts (MoE expert weights [expert, embed, mlp]) are spread over `fsdp`, in both tables: each device of an fsdp
# group stores E/fsdp whole experts. Why fsdp and not a new axis: fsdp is a batch axis and a weight-splitting axis at
# once, which is what expert parallelism needs. The default dispatch (model.moe.dispatch: exchange_tokens,
# models/moe.py) all-gathers the fsdp group's tokens, runs each device's own experts on the tokens routed to them
# and reduce-scatters the outputs back over fsdp: tokens move inside the fsdp group, expert weights never move, and
# there is no expert-parallel degree to size apart from fsdp. (dispatch gather_weights instead all-gathers the
# expert weights layer by layer, as any FSDP weight.) `tensor` keeps splitting each expert's ffn width as it splits
# the dense MLP's. The rule comes first so it wins fsdp on expert weights (flax gives each mesh axis to the first
# matching rule); their `embed` dim then stays whole in the student, and takes `data` in the teacher (below).
# The expert count must be divisible by fsdp (checked: check_experts), so every device holds whole experts.
_EXPERT_RULES = (("expert", "fsdp"),)

# The student is trained: params, gradients and two Adam moments (16 bytes/param in float32) are sharded over fsdp
# (ZeRO-3), the wide dims over tensor. It stays replicated over `data`, so gradients need no weight re-gathers there.
STUDENT_RULES = (
    _ACTIVATION_RULES
    + _EXPERT_RULES
    + (
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("norm", None),
        ("layers", None),
        ("teacher_embed", None),
        ("latent", "fsdp"),  # MLA's low-rank dims (models/mla.py): a width like embed's
        ("latent_norm", None),
    )
)

# The teacher is frozen: no gradients and no optimizer state, so nothing ever needs its full replica per data group.
# It is by far the larger model, so its weights are spread over every non-tensor axis (data too), gathered layer by
# layer in the forward pass: memory, not bandwidth, is what a 70B teacher beside a 1B student runs out of.
TEACHER_RULES = (
    _ACTIVATION_RULES
    + _EXPERT_RULES
    + (
        ("vocab", "tensor"),
        ("embed", ("fsdp", "data")),
        ("embed", "data"),  # expert weights: fsdp went to `expert`, data still splits their width
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("norm", None),
        ("layers", None),
        ("latent", ("fsdp", "data")),
        ("latent", "data"),
        ("latent_norm", None),
    )
)


def mesh_shape(data: int, fsdp: int, tensor: int, device_count: int, context: int = 1) -> tuple[int, int, int]:
    """Resolve the one -1 entry among data, fsdp, tensor and check the product (times `context`) against the
    devices that exist. Returns (data, fsdp, tensor)."""
    if context < 1:
        raise UserError(f"mesh.context must be positive, got {context}")
    device_count, rest = divmod(device_count, context)
    if rest:
        raise UserError(f"mesh.context ({context}) must divide the {device_count * context + rest} devices")
    sizes = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise UserError(f"{free[1]}: only one mesh axis may be -1")
    for key, value in sizes.items():
        if value == 0 or value < -1:
            raise UserError(f"{key} must be positive or -1, got {value}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if device_count % fixed:
            raise UserError(f"{free[0]}: {device_count} devices are not divisible by the other axes' product {fixed}")
        sizes[free[0]] = device_count // fixed
    total = math.prod(sizes.values())
    if total > device_count:
        raise UserError(f"mesh: asks for {total} devices ({data}x{fsdp}x{tensor}) but only {device_count} exist")
    if total < device_count:
        raise UserError(f"mesh: {data}x{fsdp}x{tensor} = {total} devices, but {device_count} exist; use -1 on one axis")
    return sizes["mesh.data"], sizes["mesh.fsdp"], sizes["mesh.tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: list | None = None, context: int = 1) -> Mesh:
    devices = list(jax.devices()) if devices is None else list(devices)
    data, fsdp, tensor = mesh_shape(data, fsdp, tensor, len(devices), context)
    shape = (data, fsdp, context, tensor)
    # jax.make_mesh orders devices by their physical topology (so a TPU slice's fsdp and tensor groups are
    # neighbours on the interconnect). Auto axes: GSPMD propagates shardings from the parameters and the few
    # constraints we place.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def check_batch(global_batch: int, mesh: Mesh, grad_accum: int = 1) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % (ways * grad_accum):
        raise UserError(
            f"data.global_batch ({global_batch}) must be divisible by data x fsdp ({ways})"
            + (f" x optim.grad_accum ({grad_accum})" if grad_accum > 1 else "")
        )


def check_experts(experts: int, mesh: Mesh, key: str) -> None:
    """MoE experts are spread over fsdp (the rule tables above): each device must hold whole experts."""
    ways = mesh.shape["fsdp"]
    if experts and experts % ways:
        raise UserError(
            f"{key} ({experts}) must be divisible by mesh.fsdp ({ways}), the mesh axis that carries the experts"
        )


def check_context(seq_len: int, mesh: Mesh) -> None:
    """The sequence splits evenly over the context axis."""
    context = mesh.shape.get("context", 1)
    if seq_len % context:
        raise UserError(f"data.seq_len ({seq_len}) must be divisible by mesh.context ({context})")


def check_chunks(seq_len: int, mesh: Mesh, chunk: int, key: str) -> None:
    """With the sequence split over `context`, every shard holds whole attention chunks (Llama 4's chunked layers,
    `chunk` 0 = none): a shard's queries then never share a chunk with another shard's, the layout a chunk-local
    attention without the key/value gather needs."""
    context = mesh.shape.get("context", 1)
    if chunk and context > 1 and (seq_len // context) % chunk:
        raise UserError(
            f"{key} ({chunk}) must divide the sequence length per context shard (data.seq_len {seq_len} / "
            f"mesh.context {context} = {seq_len // context})"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] arrays: rows split over data and fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(logical_specs: Any, mesh: Mesh, rules) -> Any:
    """Tree of PartitionSpecs of logical names → tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def fit_to_shape(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """Leave a dimension unsharded over any mesh axis that does not divide it (a vocab of 50257, say).

    Correct for every shape, at the cost of replication on that one dimension; real presets divide evenly.
    """
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    fitted = []
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept: list[str] = []
        for name in names:
            if dim % (math.prod(sharding.mesh.shape[a] for a in kept) * sharding.mesh.shape[name]) == 0:
                kept.append(name)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return NamedSharding(sharding.mesh, P(*fitted))


def _param_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    shardings = logical_shardings(nn.get_partition_spec(abstract_boxed), mesh, rules)
    return jax.tree.map(lambda a, s: fit_to_shape(s, a.shape), nn.unbox(abstract_boxed), shardings)


def init_sharded(init_boxed: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules) -> tuple[Any, Any]:
    """Parameters born sharded: abstract shapes → shardings → a jitted init that writes each shard in place.

    `init_boxed(rng)` returns params boxed with logical names (linen's `init`). Returns (params, shardings);
    nothing is ever materialised whole on one host.
    """
    shardings = _param_shardings(jax.eval_shape(init_boxed, rng), mesh, rules)
    params = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=shardings)(rng)
    return params, shardings


def abstract_sharded(init_boxed: Callable[[jax.Array], Any], mesh: Mesh, rules) -> Any:
    """ShapeDtypeStructs carrying shardings: the restore target for checkpoints and the AOT compile input."""
    abstract = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = _param_shardings(abstract, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract), shardings)
