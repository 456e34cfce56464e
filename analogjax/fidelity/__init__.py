"""Does the analog hold? Measurements of an analog against its teacher.

- `metrics`: output and representation fidelity on held-out documents (KL both ways, JSD, agreement, top-k overlap,
  perplexities, calibration, CKA), its report and plots;
- `transfer`, `transfer_report`, `concepts`: do the analog's stitching maps, probes and steering directions carry over
  to the teacher, per concept, against chance and random directions (`transfer_fit`: the closed-form fits from
  moments; `transfer_rows`: every figure with its 95% interval, and paired comparisons of two models);
- `measure_run`: the above for a finished run (what eval, transfer and release call).

`analogjax.fidelity` itself offers the output-fidelity names of `metrics` (its public API since the first release).
"""

from analogjax.fidelity.metrics import (
    cka_from_moments,
    cka_sums,
    default_layer_pairs,
    finalize,
    linear_cka,
    make_fidelity_steps,
    markdown_table,
    measure,
    plot,
    token_sums,
    write_report,
)

__all__ = [
    "cka_from_moments",
    "cka_sums",
    "default_layer_pairs",
    "finalize",
    "linear_cka",
    "make_fidelity_steps",
    "markdown_table",
    "measure",
    "plot",
    "token_sums",
    "write_report",
]
