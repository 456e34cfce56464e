"""The tensor table: one row (`TensorMap`) per analogjax param, saying which HF tensor holds it and how the axes
move. Import (read.py) and export (write.py) both walk this one table.

Layout facts this rests on:
- HF Linear weights are [out, in]; ours are [in, ...out] with heads split out (wq [d, h, e], wo [h, e, d]).
- HF q/k projections of these families already use the rotate-half RoPE convention, as ours do: no permutation.
- Gemma's RMSNorm scales by (1 + weight): that is our `norm_offset=1` with scale = weight, so norms copy as they are.
- Phi-3's fused qkv_proj rows are [q; k; v] and gate_up_proj rows [gate; up]: each of ours is a row range.
- Gemma 2/3's `post_attention_layernorm` is the norm *after* attention (ours attn_post_norm), not Llama's pre-MLP norm.
- Llama 4 rotates interleaved pairs (x[2i], x[2i+1]) (complex RoPE): its q/k rows are reordered within each head to
  rotate-half halves on import (evens, then odds) and back on export, as gguf.py undoes llama.cpp's reordering.
  q·k is unchanged by one reordering of both, and so is its L2 q/k norm.
- Llama 4 and gpt-oss keep all experts of a layer in one tensor per projection, already [experts, in, out] as ours:
  experts.gate_up_proj [experts, d, 2f] and experts.down_proj [experts, f, d]. Llama 4's gate_up_proj is
  [gate | up] on the last dim (`fused_axis`); gpt-oss's interleaves gate and up column by column (gate =
  [..., 0::2], up = [..., 1::2]): `interleave`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from analogjax.models.config import ModelConfig
from analogjax.models.hf.families import MoEFamily, family_of

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorMap:
    """ours (per layer) = reshape(hf[rows], flatten(groups)).transpose(perm).

    groups: the HF tensor's dims, each split into factors (q_proj [h·e, d] → ((h, e), (d,))).
    perm: for each of our dims, the index of the split dim it takes.
    row_offset, fused_rows: for a fused HF tensor (Phi-3's qkv_proj), ours is rows [row_offset, row_offset + rows)
    of a tensor with `fused_rows` rows (0 = not fused).
    """

    ours: tuple[str, ...]  # path under params["params"]
    hf: str  # HF tensor name; "{i}" is the layer index for stacked params
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    stacked: bool
    row_offset: int = 0
    fused_rows: int = 0
    # MoE models keep several stacks (models/transformer.py layer_location): this stack's i-th entry is HF layer
    # layer_offset + i·layer_stride, of layer_count entries (0: all n_layers).
    layer_offset: int = 0
    layer_stride: int = 1
    layer_count: int = 0
    # Expert weights: one HF tensor per expert ("{j}"), stacked on our axis after the layers' (0: not per expert).
    experts: int = 0
    # The HF tensor's dim that a fused tensor is fused along (Llama 4's gate_up_proj: its last).
    fused_axis: int = 0
    # Our last dim (head_dim) is in rotate-half order, the HF tensor's in interleaved pairs (Llama 4's q and k).
    interleaved: bool = False
    # The HF tensor's last dim interleaves `interleave` tensors element by element and ours is the `lane`-th
    # (gpt-oss's gate_up_proj: gate lane 0, up lane 1); 0: not interleaved. The last group is one factor then.
    interleave: int = 0
    lane: int = 0

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(g) for g in self.groups)

    @property
    def file_shape(self) -> tuple[int, ...]:
        """The shape of the whole HF tensor (the fused one, for a row range or an interleaved lane)."""
        if self.interleave:
            return self.hf_shape[:-1] + (self.hf_shape[-1] * self.interleave,)
        if not self.fused_rows:
            return self.hf_shape
        shape = list(self.hf_shape)
        shape[self.fused_axis] = self.fused_rows
        return tuple(shape)

    @property
    def split_shape(self) -> tuple[int, ...]:
        return tuple(n for g in self.groups for n in g)

    def names(self, n_layers: int) -> list:
        """HF names per layer (a list per layer of names per expert, for expert weights)."""
        if not self.stacked:
            return [self.hf]
        layers = [self.layer_offset + i * self.layer_stride for i in range(self.layer_count or n_layers)]
        if self.experts:
            return [[self.hf.format(i=i, j=j) for j in range(self.experts)] for i in layers]
        return [self.hf.format(i=i) for i in layers]

    def stack_shape(self, n_layers: int) -> tuple[int, ...]:
        """Our leading (layers[, experts]) dims."""
        return ((self.layer_count or n_layers,) if self.stacked else ()) + ((self.experts,) if self.experts else ())

    def to_hf(self, ours_layer: np.ndarray) -> np.ndarray:
        """Our per-layer array → the HF tensor (its rows, for a fused one)."""
        if self.interleaved:
            ours_layer = ours_layer[..., np.argsort(rotate_half_order(ours_layer.shape[-1]))]
        return np.transpose(ours_layer, np.argsort(self.perm)).reshape(self.hf_shape)


def rotate_half_order(head_dim: int) -> np.ndarray:
    """Indices into an interleaved-pairs head dim giving rotate-half order: ours[..., m] = hf[..., order[m]]."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """The table of `cfg`: one row per param, in the spelling of the family it exports as (families.family_of)."""
    v, d, f = cfg.vocab_size, cfg.d_model, cfg.d_ff
    h, k, e = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    layer = "model.layers.{i}."
    family = family_of(cfg)
    fused = family is not None and family.fused_projections

    def norm(ours: str, hf: str) -> TensorMap:
        return TensorMap(("layers", ours, "scale"), layer + hf + ".weight", ((d,),), (0,), True)

    maps = [
        TensorMap(("embedding",), "model.embed_tokens.weight", ((v,), (d,)), (0, 1), False),
        TensorMap(("final_norm", "scale"), "model.norm.weight", ((d,),), (0,), False),
    ]
    mlp = family.mlp_block if family is not None else "mlp."
    maps += {
        "pre": [norm("attn_norm", "input_layernorm"), norm("mlp_norm", "post_attention_layernorm")],
        "sandwich": [
            norm("attn_norm", "input_layernorm"),
            norm("attn_post_norm", "post_attention_layernorm"),
            norm("mlp_norm", "pre_feedforward_layernorm"),
            norm("mlp_post_norm", "post_feedforward_layernorm"),
        ],
        "post": [
            norm("attn_post_norm", "post_attention_layernorm"),
            norm("mlp_post_norm", "post_feedforward_layernorm"),
        ],
    }[cfg.norm_placement]
    if cfg.mla.enabled:
        maps += _mla_maps(cfg)
    elif fused:
        qkv, rows = layer + "self_attn.qkv_proj.weight", (h + 2 * k) * e
        maps += [
            TensorMap(("layers", "attn", "wq"), qkv, ((h, e), (d,)), (2, 0, 1), True, 0, rows),
            TensorMap(("layers", "attn", "wk"), qkv, ((k, e), (d,)), (2, 0, 1), True, h * e, rows),
            TensorMap(("layers", "attn", "wv"), qkv, ((k, e), (d,)), (2, 0, 1), True, (h + k) * e, rows),
        ]
    else:
        interleaved = family is not None and family.interleaved_rope
        maps += [
            TensorMap(
                ("layers", "attn", f"w{n}"),
                layer + f"self_attn.{n}_proj.weight",
                ((heads, e), (d,)),
                (2, 0, 1),
                True,
                interleaved=interleaved and n != "v",
            )
            for n, heads in (("q", h), ("k", k), ("v", k))
        ]
    if not cfg.mla.enabled:  # latent attention's o_proj is among _mla_maps' rows
        maps.append(
            TensorMap(("layers", "attn", "wo"), layer + "self_attn.o_proj.weight", ((d,), (h, e)), (1, 2, 0), True)
        )
    if cfg.attn_out_bias:
        maps.append(TensorMap(("layers", "attn", "wo_bias"), layer + "self_attn.o_proj.bias", ((d,),), (0,), True))
    if cfg.attn_sinks:
        maps.append(TensorMap(("layers", "attn", "sinks"), layer + "self_attn.sinks", ((h,),), (0,), True))
    if fused:
        gate_up = layer + "mlp.gate_up_proj.weight"
        maps += [
            TensorMap(("layers", "mlp", "w_gate"), gate_up, ((f,), (d,)), (1, 0), True, 0, 2 * f),
            TensorMap(("layers", "mlp", "w_up"), gate_up, ((f,), (d,)), (1, 0), True, f, 2 * f),
        ]
    else:
        maps += [
            TensorMap(("layers", "mlp", "w_gate"), layer + mlp + "gate_proj.weight", ((f,), (d,)), (1, 0), True),
            TensorMap(("layers", "mlp", "w_up"), layer + mlp + "up_proj.weight", ((f,), (d,)), (1, 0), True),
        ]
    maps.append(TensorMap(("layers", "mlp", "w_down"), layer + mlp + "down_proj.weight", ((d,), (f,)), (1, 0), True))
    if cfg.qkv_bias:
        for name, heads in (("q", h), ("k", k), ("v", k)):
            maps.append(
                TensorMap(
                    ("layers", "attn", f"w{name}_bias"),
                    layer + f"self_attn.{name}_proj.bias",
                    ((heads, e),),
                    (0, 1),
                    True,
                )
            )
    if cfg.qk_norm:
        for name, heads in (("q", h), ("k", k)):
            groups, perm = (((e,),), (0,)) if cfg.qk_norm_scope == "head" else (((heads, e),), (0, 1))
            maps.append(
                TensorMap(
                    ("layers", "attn", f"{name}_norm", "scale"),
                    layer + f"self_attn.{name}_norm.weight",
                    groups,
                    perm,
                    True,
                )
            )
    if not cfg.tie_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", ((v,), (d,)), (1, 0), False))
    return _moe_maps(cfg, maps) if cfg.moe.enabled else maps


def _mla_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Latent attention's rows (models/mla.py): kv_a_proj_with_mqa's rows are [latent; shared rotary key], each
    of ours a row range; kv_b_proj's rows are per head [k_nope; v], kept whole as our wkv_b [c, h, n + v]."""
    mla, d, h = cfg.mla, cfg.d_model, cfg.n_heads
    c, r, q = mla.kv_lora_rank, mla.qk_rope_head_dim, mla.q_lora_rank
    attn = "model.layers.{i}.self_attn."

    def row(ours, hf, groups, perm, offset=0, fused=0):
        return TensorMap(("layers", "attn") + ours, attn + hf, groups, perm, True, offset, fused)

    if q:
        rows = [
            row(("wq_a",), "q_a_proj.weight", ((q,), (d,)), (1, 0)),
            row(("q_a_norm", "scale"), "q_a_layernorm.weight", ((q,),), (0,)),
            row(("wq_b",), "q_b_proj.weight", ((h, mla.qk_head_dim), (q,)), (2, 0, 1)),
        ]
    else:
        rows = [row(("wq",), "q_proj.weight", ((h, mla.qk_head_dim), (d,)), (2, 0, 1))]
    return rows + [
        row(("wkv_a",), "kv_a_proj_with_mqa.weight", ((c,), (d,)), (1, 0), 0, c + r),
        row(("wk_rope",), "kv_a_proj_with_mqa.weight", ((r,), (d,)), (1, 0), c, c + r),
        row(("kv_a_norm", "scale"), "kv_a_layernorm.weight", ((c,),), (0,)),
        row(("wkv_b",), "kv_b_proj.weight", ((h, mla.qk_nope_head_dim + mla.v_head_dim), (c,)), (2, 0, 1)),
        row(("wo",), "o_proj.weight", ((d,), (h, mla.v_head_dim)), (1, 2, 0)),
    ]


def _moe_maps(cfg: ModelConfig, dense_maps: list[TensorMap]) -> list[TensorMap]:
    """An MoE model's table: each stack (dense prefix, MoE groups: transformer.layer_location) gets the attention
    and norm rows with its own HF layer numbers; MoE layers get router, per-expert and shared-expert rows."""
    from analogjax.models.transformer import moe_layout

    moe, d = cfg.moe, cfg.d_model
    f, n = cfg.expert_d_ff, moe.experts
    layer = "model.layers.{i}."
    family = family_of(cfg)
    # A dense family's name on an MoE config (refused on export by architecture_for) reads as the common spelling.
    spelling = family.moe if family is not None and family.moe else MoEFamily()
    block, names = layer + spelling.block, spelling.expert_names
    moe_rows = [TensorMap(("mlp", "router"), block + f"{spelling.router}.weight", ((n,), (d,)), (1, 0), True)]
    if moe.router_bias:
        moe_rows.append(TensorMap(("mlp", "router_bias"), block + f"{spelling.router}.bias", ((n,),), (0,), True))
    if spelling.fused_experts:  # [experts, in, out], every expert in one tensor per projection (module docstring)
        gate_up, down = block + "experts.gate_up_proj", block + "experts.down_proj"

        def gate_and_up(kind: str, hf: str, groups: tuple, perm: tuple) -> list[TensorMap]:
            # our {kind}_gate and {kind}_up out of gate_up_proj (kind "w") or its bias (kind "b")
            if spelling.interleaved_gate_up:  # gpt-oss: column by column
                return [
                    TensorMap(("mlp", f"{kind}_{w}"), hf, groups, perm, True, interleave=2, lane=lane)
                    for lane, w in enumerate(("gate", "up"))
                ]
            axis = len(groups) - 1  # Llama 4: [gate | up] on the last dim
            return [
                TensorMap(("mlp", f"{kind}_{w}"), hf, groups, perm, True, offset, 2 * f, fused_axis=axis)
                for offset, w in ((0, "gate"), (f, "up"))
            ]

        moe_rows += gate_and_up("w", gate_up, ((n,), (d,), (f,)), (0, 1, 2))
        moe_rows.append(TensorMap(("mlp", "w_down"), down, ((n,), (f,), (d,)), (0, 1, 2), True))
        if moe.expert_biases:
            moe_rows += gate_and_up("b", gate_up + "_bias", ((n,), (f,)), (0, 1))
            moe_rows.append(TensorMap(("mlp", "b_down"), down + "_bias", ((n,), (d,)), (0, 1), True))
    else:
        moe_rows += [
            TensorMap(("mlp", w), block + f"experts.{{j}}.{name}.weight", shape, (1, 0), True, experts=n)
            for w, name, shape in (
                ("w_gate", names[0], ((f,), (d,))),
                ("w_up", names[1], ((f,), (d,))),
                ("w_down", names[2], ((d,), (f,))),
            )
        ]
    if moe.expert_bias:  # DeepSeek-V3's selection-only bias
        moe_rows.append(
            TensorMap(("mlp", "expert_bias"), block + f"{spelling.router}.e_score_correction_bias", ((n,),), (0,), True)
        )
    if moe.shared_d_ff:
        g = moe.shared_d_ff
        moe_rows += [
            TensorMap(("mlp", "shared", w), block + f"{spelling.shared_block}.{p}.weight", shape, (1, 0), True)
            for w, p, shape in (
                ("w_gate", "gate_proj", ((g,), (d,))),
                ("w_up", "up_proj", ((g,), (d,))),
                ("w_down", "down_proj", ((d,), (g,))),
            )
        ]
    if moe.shared_gate:
        moe_rows.append(
            TensorMap(("mlp", "shared_gate"), layer + "mlp.shared_expert_gate.weight", ((1,), (d,)), (1, 0), True)
        )
    unstacked = [m for m in dense_maps if not m.stacked]
    per_layer = [m for m in dense_maps if m.stacked and m.ours[1] != "mlp"]
    dense_mlp = [m for m in dense_maps if m.stacked and m.ours[1] == "mlp"]

    def stack(rows, path, offset, stride, count):
        return [
            dataclasses.replace(
                m,
                ours=path + m.ours[1:] if m.ours[0] == "layers" else path + m.ours,
                layer_offset=offset,
                layer_stride=stride,
                layer_count=count,
            )
            for m in rows
        ]

    prefix, groups = moe_layout(cfg)
    out = list(unstacked)
    if prefix:
        out += stack(per_layer + dense_mlp, ("layers",), 0, 1, prefix)
    if moe.every == 1:
        return out + stack(per_layer + moe_rows, ("moe_layers",), prefix, 1, groups)
    for j in range(moe.every - 1):
        out += stack(per_layer + dense_mlp, ("moe_layers", f"dense_{j}"), prefix + j, moe.every, groups)
    return out + stack(per_layer + moe_rows, ("moe_layers", "moe"), prefix + moe.every - 1, moe.every, groups)


def get_param(tree: dict, path: tuple[str, ...]) -> Any:
    """The entry of a params tree at `path` (a TensorMap's `ours`)."""
    for key in path:
        tree = tree[key]
    return tree


def set_param(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
