"""`analogjax config [--config FILE] [--set k=v ...] [--explain]`: the fully resolved config, as a run would use it.

A config the run would refuse on sight (an unknown key, a wrong type, an impossible value, an unknown loss term) is
refused here too; what only the data, the devices or a checkpoint can tell is checked when a run starts.

The YAML printed loads back (`load_config`) to an equal config. With --explain, each value is followed by where it
came from: `file`, `--set`, `preset NAME` (a model section that names a preset and leaves the value out),
`default (preset NAME)` (a model section left out entirely: its default is a preset), `teacher.hf_path config.json`
(a teacher's shape read from its Hugging Face folder) or `default` (the schema's own default). The rule for partly
given sections is documented in analogjax/config.py (`_onto_field_defaults`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from analogjax.cli import add_config_arguments


def add_arguments(parser) -> None:
    add_config_arguments(parser, config_required=False)
    parser.add_argument(
        "--explain",
        action="store_true",
        help="follow each value with where it came from: file, --set, preset NAME or default",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="the config is the demo's (configs/demo.yaml's shape: run, teacher_steps, ...)",
    )


def run(args) -> int:
    from analogjax.config import Config, from_dict, read_layers, to_yaml

    given_by_file, given_by_set, merged = read_layers(args.config, args.overrides)
    if args.demo:
        from analogjax.recipes.demo import DemoConfig

        config = from_dict(DemoConfig, merged)
    else:
        config = from_dict(Config, merged)
    # What a run checks when it is built, short of devices and files: the objective's terms.
    from analogjax.objective import check_distill

    check_distill(config.run.distill if args.demo else config.distill)
    comments = provenance(config, given_by_file, given_by_set) if args.explain else None
    sys.stdout.write(to_yaml(config, comments))
    return 0


def provenance(config: Any, by_file: Any, by_set: Any, missing: str = "default", prefix: str = "") -> dict[str, str]:
    """{dotted key: where its value came from} for every leaf of `config`, given the raw dicts of the file and of
    --set. `missing` names the source of values neither gives in this section."""
    by_file = by_file if isinstance(by_file, dict) else {}
    by_set = by_set if isinstance(by_set, dict) else {}
    out: dict[str, str] = {}
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if f.name in by_set and not dataclasses.is_dataclass(value):
            out[key] = "--set"
        elif f.name in by_file and not dataclasses.is_dataclass(value):
            out[key] = "file"
        elif not dataclasses.is_dataclass(value):
            out[key] = missing
        else:
            out.update(
                provenance(
                    value,
                    by_file.get(f.name),
                    by_set.get(f.name),
                    _missing_in(config, f.name, value, by_file, by_set, missing),
                    key + ".",
                )
            )
    return out


def _missing_in(parent: Any, name: str, section: Any, by_file: dict, by_set: dict, missing: str) -> str:
    """Where the values a nested section leaves out come from."""
    given = name in by_file or name in by_set
    names_preset = any(isinstance(d.get(name), dict) and "preset" in d[name] for d in (by_file, by_set))
    if name == "model" and getattr(parent, "hf_path", None):
        return "teacher.hf_path config.json"
    preset = getattr(section, "preset", "")
    if preset and names_preset:
        return f"preset {preset}"
    if preset and not given:
        return f"default (preset {preset})"
    return "default" if given else missing
