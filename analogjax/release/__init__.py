"""The release: what a lab publishes of an analog.

- `bundle`: the HF folder, the fidelity and transfer report and the model card of a finished run (`write_release`),
  and the HF folder alone (`export_run`);
- `model_card`: the card's text and what it may disclose;
- `gates`: the release gate (size cap, task ceilings, fidelity floors, overrides) and the card's release statement.
"""

from analogjax.release.bundle import bundle_tokenizer, export_run, with_release_overrides, write_release

__all__ = ["bundle_tokenizer", "export_run", "with_release_overrides", "write_release"]
