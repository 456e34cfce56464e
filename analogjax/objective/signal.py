"""The teacher's signal: the one shape in which a teacher's outputs reach the loss, the eval step and fidelity.

Whatever the teacher is (an analogjax model, a logits function, a teacher cache), `teacher.forward` returns a
`TeacherSignal`, already cut out of autodiff. Its `kind` says what it carries:
- "hidden": final normed hidden states [b, s, d] plus the LM head [d, v] (analogjax models: the fused loss builds
  the teacher's logits one chunk at a time, never all of them; `softcap` is the final soft-cap to apply to them);
- "logits": logits [b, s, v] (a bring-your-own teacher; already capped by the teacher if it caps);
- "topk" / "sampled": a teacher cache's rows, tokens flattened (sparse.TopKTeacher / sparse.SampledTeacher).
`layers` holds per-layer residual streams [l, b, s, d] when a hidden-state term asked for them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from analogjax.errors import UserError
from analogjax.models.transformer import softcap_logits
from analogjax.objective.sparse import SampledTeacher, TopKTeacher
from analogjax.objective.terms import LIVE_SIGNALS, SPARSE_SIGNALS


class TeacherSignal(struct.PyTreeNode):
    kind: str = struct.field(pytree_node=False)
    rows: Any  # hidden [b, s, d] | logits [b, s, v] | TopKTeacher | SampledTeacher (tokens flattened)
    head: Any = None  # [d, v] for kind "hidden"
    layers: Any = None  # [l, b, s, d] when collected
    softcap: float = struct.field(pytree_node=False, default=0.0)  # final soft-cap of logits built from hidden

    @classmethod
    def from_hidden(cls, hidden: jax.Array, head: jax.Array, *, layers=None, softcap: float = 0.0) -> TeacherSignal:
        return cls("hidden", hidden, head, layers, float(softcap))

    @classmethod
    def from_logits(cls, logits: jax.Array, *, layers=None) -> TeacherSignal:
        return cls("logits", logits, None, layers)

    @classmethod
    def from_rows(cls, rows: TopKTeacher | SampledTeacher) -> TeacherSignal:
        """A cache's rows: top-k (values, indices, lse) or sampled (ids, weights)."""
        return cls("topk" if isinstance(rows, TopKTeacher) else "sampled", rows)

    @property
    def is_live(self) -> bool:
        """Full distributions (hidden or logits), as opposed to a cache's sparse rows."""
        return self.kind in LIVE_SIGNALS

    def token_rows(self) -> Any:
        """The rows with tokens flattened to one leading axis, as the loss walks them."""
        if self.kind in SPARSE_SIGNALS:
            return self.rows
        return self.rows.reshape(-1, self.rows.shape[-1])

    def logits(self) -> jax.Array:
        """Float32 logits with the rows' leading shape (materialised: for eval-sized batches), soft-capped as the
        teacher caps them."""
        if self.kind == "logits":
            return self.rows.astype(jnp.float32)
        if self.kind != "hidden":
            raise UserError(f"a {self.kind} teacher signal carries no full logits (a teacher cache's rows)")
        head = self.head.astype(self.rows.dtype)
        return softcap_logits(
            jnp.einsum("...d,dv->...v", self.rows, head, preferred_element_type=jnp.float32), self.softcap
        )
