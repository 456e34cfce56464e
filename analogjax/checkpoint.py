"""Orbax checkpoints of the student: what is saved, where, and how a run comes back.

A checkpoint step holds four items:
  params  the student model's parameters alone (what a teacher load, an export or a release reads)
  train   the rest of the train state: step, optimizer state, RNG, hidden-state projections
  data    the Grain iterator's state, one file per process (so resume sees exactly the next batch)
  meta    the resolved config, run identity and provenance (JSON)
The teacher is never written: it never changes, and it is an input of the step, not part of its state.

Resume order (see `restore_or_init` in train.py): the latest complete checkpoint in the workdir, else
`checkpoint.init_path` (params only), else a fresh init.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from analogjax.errors import UserError

ITEMS = ("params", "train", "data", "meta")


class Checkpointer:
    def __init__(self, directory: str | Path, *, every: int = 0, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Never pick up a half-written step: Orbax writes to a temporary folder and renames on commit;
            # leftovers of a crash are cleaned, not restored.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_iterator, meta: dict[str, Any]) -> None:
        """Save (asynchronously when configured). The iterator's state is read now, at the step boundary."""
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
                 "hidden_proj": state.params.get("hidden_proj", {})}
        items = dict(
            params=ocp.args.StandardSave(state.params["model"]),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_iterator) -> Any:
        """Restore onto the shardings carried by `abstract_state` (ShapeDtypeStructs): arrays land on their devices."""
        train_target = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                        "rng": abstract_state.rng, "hidden_proj": abstract_state.params.get("hidden_proj", {})}
        items = dict(
            params=ocp.args.StandardRestore(abstract_state.params["model"]),
            train=ocp.args.StandardRestore(train_target),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        train = restored["train"]
        params = {"model": restored["params"]}
        if "hidden_proj" in abstract_state.params:
            params["hidden_proj"] = train["hidden_proj"]
        return abstract_state.replace(
            step=train["step"], params=params, opt_state=train["opt_state"], rng=train["rng"]
        )

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str | Path, abstract_params, step: int | None = None) -> Any:
    """The model params of a checkpoint directory (latest step), restored sharded onto `abstract_params`.

    Used for the teacher (read-only) and for `checkpoint.init_path`. Each process reads only its shards.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise UserError(f"checkpoint directory not found: {directory}")
    manager = ocp.CheckpointManager(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise UserError(f"no complete checkpoint in {directory}")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise UserError(f"{directory}: checkpoint {step} does not fit this model: {str(exc).splitlines()[0]}") from None
    finally:
        manager.close()
    return jax.tree.map(lambda x: x, restored["params"])
