"""`analogjax compile-check --config FILE --topology v5p-256`: will this run fit that pod, and how fast could it go?

The real distill step (the one `setup.build` jits for training, built by `setup.build` itself with the teacher under
its own rules) is compiled ahead of time for a TPU topology described by libtpu (pip install analogjax[tpu]);
no TPU is needed, nothing is allocated. The mesh is built from the topology's devices by `mesh.make_mesh`, exactly
as a run on that pod builds it from `jax.devices()`.

Reported per chip: XLA's memory plan (arguments, temporaries, outputs, the donated state aliased in place) against
the chip's HBM; FLOPs per step from XLA's cost analysis next to analogjax.runtime.flops' model count; a roofline
estimate of the step time (the slower of compute and HBM traffic, collectives assumed overlapped) and the MFU it
implies.
The last line printed is one JSON object (the record benchmarks and tests read).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

from analogjax.errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class Generation:
    """Per-chip facts of one TPU generation (vendor figures) and how its slice names count."""

    jax_name: str  # the generation as libtpu's topology strings spell it
    cores_per_name_unit: int  # v4-8 and v5p-8 count TensorCores (2 per chip); v5e-8 and v6e-8 count chips
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # inter-chip interconnect, all links of one chip together
    chip_config: str | None  # megacore: one JAX device per chip on two-core chips


GENERATIONS = {
    "v4": Generation("v4", 2, 3, 32 * GIB, 275e12, 1.2e12, 300e9, "megacore"),
    "v5p": Generation("v5", 2, 3, 95 * GIB, 459e12, 2.765e12, 600e9, "megacore"),
    "v5e": Generation("v5e", 1, 2, 16 * GIB, 197e12, 0.819e12, 200e9, None),
    "v6e": Generation("v6e", 1, 2, 32 * GIB, 918e12, 1.64e12, 448e9, None),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}

# Chip grids of the standard slice shapes, by chip count: as cube-like as the powers of two allow (3-D), or a
# rectangle with the longer side last (2-D), which is how Cloud TPU lays slices out.
_GRIDS_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_CHIPS_PER_HOST = {3: 4, 2: 4}  # multi-host slices: 4 chips per host (a 2x2 block); v5e/v6e-8 and smaller are one host


@dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it, e.g. v5p-256
    generation: Generation
    chips: int
    grid: tuple[int, ...]

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.jax_name}:{'x'.join(map(str, self.grid))}"

    @property
    def hosts(self) -> int:
        if self.generation.dims == 2 and self.chips <= 8:
            return 1
        return max(self.chips // _CHIPS_PER_HOST[self.generation.dims], 1)


def parse_topology(name: str) -> Topology:
    """`v4-32`, `v5p-256`, `v5e-64` (or v5litepod-64), `v6e-256` → chip count and grid; UserError otherwise."""
    family, sep, count = name.strip().lower().partition("-")
    family = ALIASES.get(family, family)
    if not sep or family not in GENERATIONS or not count.isdigit():
        raise UserError(f"--topology: expected a TPU slice name like v4-32, v5e-64, v5p-256 or v6e-256, got {name!r}")
    gen = GENERATIONS[family]
    units = int(count)
    if units % gen.cores_per_name_unit:
        raise UserError(
            f"--topology {name}: {family} slice names count TensorCores ({gen.cores_per_name_unit} per "
            "chip), so the number must be even"
        )
    chips = units // gen.cores_per_name_unit
    grids = _GRIDS_3D if gen.dims == 3 else _GRIDS_2D
    if chips not in grids:
        sizes = ", ".join(f"{family}-{c * gen.cores_per_name_unit}" for c in grids)
        raise UserError(f"--topology {name}: not a standard {family} slice; known: {sizes}")
    return Topology(name, gen, chips, grids[chips])


def topology_devices(topology: Topology) -> list:
    """Compile-only devices of the slice, from libtpu (nothing is opened on any chip)."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("compile-check needs libtpu: pip install 'analogjax[tpu]'")
    # Compile-only use never touches a chip, so libtpu's one-process-per-host lock is irrelevant here; without this
    # a second compile-check (or a stray JAX process that loaded libtpu) would refuse to start.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Not on GCE: do not wait on a metadata server to learn an accelerator type we are about to state.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    gen = topology.generation
    single_host = topology.hosts == 1
    host_bounds = (*topology.grid, 1)[:3] if single_host else (2, 2, 1)
    kwargs: dict[str, Any] = dict(chips_per_host_bounds=host_bounds, wrap=(topology.chips >= 64 and gen.dims == 3,) * 3)
    if gen.chip_config:
        kwargs["chip_config_name"] = gen.chip_config
    desc = topologies.get_topology_desc(topology.libtpu_name, "tpu", **kwargs)
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise UserError(
            f"libtpu described {topology.libtpu_name} with {len(devices)} devices, expected "
            f"{topology.chips}; is libtpu too old or too new for this jax?"
        )
    return devices


@dataclass(frozen=True)
class Plan:
    """What compiling one distill step for one topology says about it."""

    topology: Topology
    mesh_shape: dict[str, int]
    argument_bytes: int  # per chip: state, teacher params, batch (the state is donated into the outputs)
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated arguments
    temp_bytes: int  # activations, gradients, gathered weights, collective buffers
    code_bytes: int
    xla_flops_per_chip: float  # XLA cost analysis of the per-chip program
    xla_bytes_accessed_per_chip: float
    model_flops_per_step: float  # analogjax.runtime.flops: 3x student forward + teacher forward, all chips, no remat
    recompute_flops_per_step: float  # the student's forward again in the backward pass when remat is on
    ici_bytes_per_chip: float  # weight all-gathers and gradient reductions one chip receives per step
    tokens_per_step: int

    @property
    def bytes_per_chip(self) -> int:
        """Peak HBM the step needs on one chip: inputs + temporaries + any outputs not written over the inputs."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.bytes_per_chip <= self.topology.generation.hbm_bytes

    @property
    def seconds(self) -> dict[str, float]:
        """Per-chip time of each resource at its peak. XLA's cost analysis counts a scanned layer body once, so
        compute uses the model count (plus remat's recomputation) when that is larger; HBM traffic is XLA's
        count (a lower bound for the same reason); ICI is the weight gathers and gradient reductions."""
        gen = self.topology.generation
        compute = max(
            self.xla_flops_per_chip, (self.model_flops_per_step + self.recompute_flops_per_step) / self.topology.chips
        )
        return {
            "compute": compute / gen.peak_bf16_flops,
            "hbm": self.xla_bytes_accessed_per_chip / gen.hbm_bytes_per_s,
            "ici": self.ici_bytes_per_chip / gen.ici_bytes_per_s,
        }

    @property
    def step_seconds(self) -> float:
        """Roofline: the slowest resource, the others assumed to overlap with it. Optimistic: real steps are
        slower (imperfect overlap, kernel efficiency below peak), so the implied MFU is an upper bound."""
        return max(self.seconds.values())

    @property
    def mfu(self) -> float:
        """The roofline MFU bound: model FLOPs over the roofline step at vendor peaks. Real steps are slower."""
        gen = self.topology.generation
        return self.model_flops_per_step / (self.step_seconds * self.topology.chips * gen.peak_bf16_flops)

    def record(self) -> dict[str, Any]:
        gen = self.topology.generation
        return {
            "topology": self.topology.name,
            "libtpu_topology": self.topology.libtpu_name,
            "chips": self.topology.chips,
            "hosts": self.topology.hosts,
            "mesh": self.mesh_shape,
            "bytes_per_chip": self.bytes_per_chip,
            "hbm_per_chip": gen.hbm_bytes,
            "argument_bytes": self.argument_bytes,
            "temp_bytes": self.temp_bytes,
            "output_bytes": self.output_bytes,
            "alias_bytes": self.alias_bytes,
            "fits": self.fits,
            "flops_per_step": self.model_flops_per_step,
            "xla_flops_per_step": self.xla_flops_per_chip * self.topology.chips,
            "tokens_per_step": self.tokens_per_step,
            "roofline_step_s": self.step_seconds,
            "roofline_bound_by": max(self.seconds, key=self.seconds.get),
            "roofline_tokens_per_s_bound": self.tokens_per_step / self.step_seconds,
            "roofline_mfu_bound": self.mfu,
        }


def compile_plan(config, topology: Topology) -> Plan:
    """Compile `config`'s distill step for `topology` and read XLA's memory and cost analyses. The run is built by
    `setup.build` itself (abstract: nothing read or allocated), so this compiles exactly the program training runs,
    after exactly the checks a run makes."""
    import jax

    from analogjax.data.batch import abstract_batch
    from analogjax.runtime import compute_dtype
    from analogjax.runtime.flops import distill_flops_per_step, forward_flops_per_token
    from analogjax.setup import build, build_mesh
    from analogjax.teacher import runs_live
    from analogjax.teacher_cache import cache_batch_fields

    # `dtype: auto` would resolve by the machine tracing the step (this CPU); the plan's chips run bf16
    def on_chip(model):
        return dataclasses.replace(model, dtype=compute_dtype.resolve(model.dtype, backend="tpu"))

    teacher_config = dataclasses.replace(config.teacher, model=on_chip(config.teacher.model))
    config = dataclasses.replace(config, model=on_chip(config.model), teacher=teacher_config)
    mesh = build_mesh(config, devices=topology_devices(topology))
    run = build(config, mesh=mesh, init=False, abstract=True)
    teacher = run.teacher
    # A cached teacher's step reads the cache's fields from the batch: the batch training feeds, from the one schema
    # (data/batch.py), with the fields of the cache's own layout.
    cache_fields = cache_batch_fields(teacher.cache_layout) if teacher is not None and teacher.is_cached else {}
    batch = abstract_batch(config.data.global_batch, config.data.seq_len, run.batch_sharding, cache_fields)
    with jax.set_mesh(mesh):
        compiled = run.step_fn.lower(run.abstract_state, run.teacher_params, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax returned one dict per program
    tokens = config.data.global_batch * config.data.seq_len
    live = runs_live(teacher)
    return Plan(
        topology=topology,
        mesh_shape=dict(mesh.shape),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        xla_flops_per_chip=float(cost.get("flops", 0.0)),
        xla_bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
        model_flops_per_step=distill_flops_per_step(
            config.model, config.teacher.model if live else None, tokens, config.data.seq_len
        ),
        recompute_flops_per_step=(
            forward_flops_per_token(config.model, config.data.seq_len) * tokens if config.model.remat != "none" else 0.0
        ),
        ici_bytes_per_chip=ici_bytes_per_chip(config, dict(mesh.shape), with_teacher=live),
        tokens_per_step=tokens,
    )


def ici_bytes_per_chip(config, mesh_shape: dict[str, int], *, with_teacher: bool) -> float:
    """Bytes one chip receives per step from the collectives the sharding rules imply (float32 params).

    An all-gather or reduce-scatter of W bytes over n chips brings W·(n−1)/n into each; an all-reduce twice that.
    Student (fsdp-sharded, replicated over data): gathered for the forward and again for the backward, gradients
    reduce-scattered over fsdp, then all-reduced over data. Teacher (sharded over fsdp and data): gathered once
    per microbatch for its forward. With a context axis, params are replicated over it too (gradients all-reduced
    over data x context) and every layer all-gathers keys and values over it (student: forward, remat recompute and
    the backward's reduce-scatter; teacher: forward). Activations' collectives over the tensor axis are not counted.
    MoE layers with model.moe.dispatch exchange_tokens (models/moe.py) never gather routed expert weights over fsdp
    (only their embed dim over data, in the teacher; the student's expert gradients stay on their fsdp device and are
    all-reduced over data); instead each MoE layer all-gathers the fsdp group's tokens and reduce-scatters float32
    outputs: per chip (fsdp-1) x its tokens x d_model each way, once for the teacher's forward and three times for
    the student's (forward, remat recompute, and the backward's transposes).
    """
    from analogjax.runtime.flops import param_count

    data, fsdp, tensor = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["tensor"]
    context = mesh_shape.get("context", 1)
    accum = config.optim.grad_accum

    def share(n: int) -> float:
        return (n - 1) / n

    def kv_gathers(model) -> float:  # one layer's full-sequence keys and values for this chip's rows, all layers
        rows = config.data.global_batch / (data * fsdp)
        width = 2 * model.kv_heads * model.dim_per_head  # keys and values per token
        if model.mla.enabled:  # latent attention gathers its expanded keys and values (models/mla.py)
            width = model.n_heads * (model.mla.qk_head_dim + model.mla.v_head_dim)
        per_layer = rows * config.data.seq_len * width / tensor
        return per_layer * (2 if model.dtype == "bfloat16" else 4) * model.n_layers * share(context)

    def exchanged(model) -> tuple[float, float]:
        """(routed expert params that stay on their fsdp device, bytes of one forward's token exchange per chip)."""
        moe = model.moe
        if not (moe.enabled and moe.dispatch == "exchange_tokens" and fsdp > 1):
            return 0.0, 0.0
        layers = sum(moe.is_moe_layer(i) for i in range(model.n_layers))
        tokens = config.data.global_batch / (data * fsdp) * config.data.seq_len / context
        per_layer = (fsdp - 1) * tokens * model.d_model * ((2 if model.dtype == "bfloat16" else 4) + 4)
        return layers * moe.experts * 3 * model.d_model * model.expert_d_ff, layers * per_layer

    routed, moved = exchanged(config.model)
    student = 4.0 * (param_count(config.model) - routed) / tensor
    experts = 4.0 * routed / tensor
    total = student * share(fsdp) * 2 * accum + student * share(fsdp) + 2 * (student / fsdp) * share(data * context)
    total += 2 * (experts / fsdp) * share(data * context) + moved * 3 * accum
    total += kv_gathers(config.model) * 3
    if with_teacher:
        routed, moved = exchanged(config.teacher.model)
        dense = param_count(config.teacher.model) - routed
        teacher = 4.0 / tensor * (dense * share(data * fsdp) + routed / fsdp * share(data))
        total += (teacher + moved) * accum
        total += kv_gathers(config.teacher.model)
    return total


def report(plan: Plan) -> list[str]:
    """Human-readable lines, then the JSON record as the last line."""
    rec = plan.record()
    gen = plan.topology.generation

    def gib(n: float) -> str:
        return f"{n / GIB:8.2f} GiB"

    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
    lines = [
        f"topology   {plan.topology.name} ({plan.topology.libtpu_name}): {plan.topology.chips} chips on "
        f"{plan.topology.hosts} host(s); mesh {mesh}",
        "memory per chip (XLA's compiled plan)",
        f"  arguments    {gib(plan.argument_bytes)}   student state + teacher params + batch shards",
        f"  temporaries  {gib(plan.temp_bytes)}   activations, gradients, gathered weights",
        f"  outputs      {gib(plan.output_bytes)}   of which {gib(plan.alias_bytes).strip()} written over the "
        "donated state",
        f"  total        {gib(plan.bytes_per_chip)}   of {gib(gen.hbm_bytes).strip()} HBM: "
        + ("fits" if plan.fits else "DOES NOT FIT"),
        "FLOPs per step",
        f"  model count (runtime.flops: 3x student fwd + teacher fwd, no remat)  {plan.model_flops_per_step:.3e}",
        f"  XLA cost analysis x chips (may count a scanned layer body once)        {rec['xla_flops_per_step']:.3e}",
        "roofline per chip (each resource at its peak; the slowest bounds the step)",
        *(f"  {name:<8} {seconds * 1e3:10.1f} ms" for name, seconds in plan.seconds.items()),
        f"  step     {rec['roofline_step_s'] * 1e3:10.1f} ms  ({rec['roofline_bound_by']}-bound): at most "
        f"{rec['roofline_tokens_per_s_bound']:.3g} tokens/s; roofline MFU bound {rec['roofline_mfu_bound']:.1%} "
        "(vendor peaks, perfect overlap: an upper bound, not an estimate)",
        json.dumps(rec),
    ]
    return lines
