"""What the step minimises.

- `core`: `Objective`, built once from the distill config: its terms, how it reads the teacher's signal, the loss
  and the eval sums;
- `terms`: the term registry, one record per kind of term (function, parameters, T² default, sparse stand-in);
- `signal`: `TeacherSignal`, the one shape of a teacher's outputs;
- `divergences`: per-token divergences on logits (public as `analogjax.losses`);
- `fused`: the chunked loss that never holds [tokens, vocab] logits;
- `sparse`: top-k and sampled teachers (a teacher cache's rows);
- `hidden`: hidden-state matching through learned projections.
"""

from analogjax.objective.core import Objective, StudentOutputs, check_distill, check_vocab, needs_teacher
from analogjax.objective.signal import TeacherSignal
from analogjax.objective.terms import TERMS, Term

__all__ = [
    "TERMS",
    "Objective",
    "StudentOutputs",
    "TeacherSignal",
    "Term",
    "check_distill",
    "check_vocab",
    "needs_teacher",
]
