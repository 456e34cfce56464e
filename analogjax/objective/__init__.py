"""What the step minimises.

- `core`: the objective: config terms → weighted, scheduled, masked sums;
- `divergences`: per-token divergences on logits (public as `analogjax.losses`);
- `fused`: the chunked loss that never holds [tokens, vocab] logits;
- `sparse`: top-k and sampled teachers (a teacher cache's signal);
- `hidden`: hidden-state matching through learned projections.
"""

from analogjax.objective.core import (  # noqa: F401
    HIDDEN_KINDS,
    Outputs,
    check_distill,
    global_chunk,
    needs_layers,
    needs_teacher,
    objective,
    router_terms,
    scheduled,
)
