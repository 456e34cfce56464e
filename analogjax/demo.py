"""`analogjax demo`: the whole analog workflow on an embedded corpus, nothing downloaded.

1. corpus: the Python standard library's own source files on this machine;
2. tokenizer: a byte-level BPE trained on that corpus;
3. teacher: a small model pretrained on it (the stand-in for a lab's frontier model);
4. analog: a student with about 1/8 of the teacher's parameters, distilled from it;
5. baseline: the same student shape trained on CE alone, same tokens, same steps;
6. summary.json and a table: every number measured on held-out documents, none fixed.

Each phase writes its own sub-workdir with checkpoints, so rerunning the demo resumes instead of redoing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from analogjax.cli import add_config_arguments
from analogjax.config import Config, DistillConfig, LossTerm, OptimConfig, TeacherConfig, TrainConfig, load_config
from analogjax.data.spec import DataConfig
from analogjax.errors import UserError
from analogjax.models.config import ModelConfig


def _demo_run() -> Config:
    """The analog's run. Sized for 2 CPU cores: the whole demo finishes in well under 10 minutes."""
    return Config(
        # ~0.6M parameters, most of them the (tied) embedding of the 8k vocabulary: 1/8 of the teacher.
        model=ModelConfig(vocab_size=8192, d_model=64, n_layers=2, n_heads=2, d_ff=192, tie_embeddings=True),
        teacher=TeacherConfig(model=ModelConfig(vocab_size=8192, d_model=192, n_layers=4, n_heads=4, d_ff=512)),
        data=DataConfig(global_batch=16, seq_len=128),
        distill=DistillConfig(terms=(LossTerm("forward_kl", 0.7), LossTerm("ce", 0.3)), temperature=1.0),
        optim=OptimConfig(learning_rate=5e-3, warmup_steps=10),
        train=TrainConfig(steps=150, log_every=10, eval_batches=8),
    )


@dataclass(frozen=True)
class DemoConfig:
    run: Config = field(default_factory=_demo_run)  # the analog's run: student, teacher shape, data, objective
    teacher_steps: int = 150
    teacher_learning_rate: float = 3e-3
    tokenizer_vocab: int = 8192  # 0 = UTF-8 bytes instead of a trained BPE

    def check(self, prefix: str) -> None:
        if self.teacher_steps <= 0:
            raise UserError("teacher_steps must be positive")


def load_demo_config(path: str | None, overrides) -> DemoConfig:
    """The embedded defaults above, or a YAML file of the same shape (configs/demo.yaml), plus overrides."""
    return load_config(path, overrides, schema=DemoConfig)


def add_arguments(parser) -> None:
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--workdir", default="runs/demo", help="where every phase writes (default: runs/demo)")
    parser.add_argument("--no-progress", action="store_true")


def phase_configs(demo: DemoConfig, workdir: Path, tokenizer: str) -> dict[str, Config]:
    """The three runs. They share data (and so tokens, in the same order), seed and step count where it matters."""
    base = demo.run
    vocab = base.model.vocab_size
    # The tokenized corpus is cached inside the workdir: nothing is written elsewhere.
    data = dataclasses.replace(base.data, tokenizer=tokenizer, cache_dir=base.data.cache_dir or str(workdir / "cache"))
    ce_only = DistillConfig(terms=(LossTerm("ce", 1.0),), chunk_size=base.distill.chunk_size)
    teacher_model = dataclasses.replace(base.teacher.model, vocab_size=vocab)
    teacher_run = dataclasses.replace(
        base, model=teacher_model, data=data, distill=ce_only,
        train=dataclasses.replace(base.train, steps=demo.teacher_steps),
        optim=dataclasses.replace(base.optim, learning_rate=demo.teacher_learning_rate),
    )
    teacher_section = dataclasses.replace(base.teacher, model=teacher_model,
                                          checkpoint=str(workdir / "teacher" / "checkpoints"))
    analog_run = dataclasses.replace(base, data=data, teacher=teacher_section)
    baseline_run = dataclasses.replace(analog_run, distill=ce_only)
    return {"teacher": teacher_run, "analog": analog_run, "baseline": baseline_run}


def run(args) -> int:
    started = time.perf_counter()
    demo = load_demo_config(args.config, args.overrides)
    workdir = Path(args.workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} exists and is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)

    import jax

    from analogjax.data import train_bpe_tokenizer
    from analogjax.data.stdlib_corpus import stdlib_texts
    from analogjax.flops import param_count
    from analogjax.setup import evaluate
    from analogjax.train import run_training

    tokenizer = "bytes"
    if demo.tokenizer_vocab:
        tokenizer = str(workdir / "tokenizer.json")
        if not Path(tokenizer).exists():
            _say(f"training a {demo.tokenizer_vocab}-token BPE on the standard library's sources")
            train_bpe_tokenizer(stdlib_texts(), demo.tokenizer_vocab, tokenizer)
    phases = phase_configs(demo, workdir, tokenizer)
    progress = not args.no_progress
    results = {}
    for name in ("teacher", "analog", "baseline"):
        _say(f"{name}: {phases[name].train.steps} steps")
        results[name] = run_training(phases[name], workdir / name, progress=progress)

    # Measure analog and baseline against the teacher on the same held-out batches, at T=1, with the analog run's
    # own eval step and teacher (the baseline has the same model, so the same shardings).
    analog_cfg = phases["analog"]
    analog_run = results["analog"]["run"]
    batches = analog_cfg.train.eval_batches
    summary: dict = {"teacher": {"params": param_count(phases["teacher"].model),
                                 "heldout_ce": results["teacher"]["heldout"]["ce"]}}
    with jax.set_mesh(analog_run.mesh):
        for name in ("analog", "baseline"):
            m = evaluate(analog_run, results[name]["state"].params["model"], batches)
            summary[name] = {"params": param_count(analog_cfg.model), "heldout_ce": m["ce"],
                             "kl_teacher": m["kl"], "agreement": m["agreement"]}
        summary["teacher"]["heldout_ce_on_eval_batches"] = m["teacher_ce"]
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["tokens_per_run"] = analog_cfg.train.steps * analog_cfg.data.global_batch * analog_cfg.data.seq_len
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_table(summary))

    # The deliverable: a Hugging Face folder with a model card and the measured fidelity report.
    from analogjax.release import write_release

    _say("writing the release bundle")
    bundle = write_release(workdir / "analog", workdir / "release", force=True, teacher=analog_run.teacher,
                           teacher_params=analog_run.teacher_params)
    if jax.process_index() == 0:
        print(f"release bundle: {bundle}")
    return 0


def format_table(summary: dict) -> str:
    rows = [f"{'model':<10} {'params':>10} {'heldout_ce':>11} {'kl_teacher':>11} {'agreement':>10}"]
    for name in ("teacher", "analog", "baseline"):
        s = summary[name]
        kl = f"{s['kl_teacher']:.4f}" if "kl_teacher" in s else "-"
        agree = f"{s['agreement']:.4f}" if "agreement" in s else "-"
        rows.append(f"{name:<10} {s['params']:>10,} {s['heldout_ce']:>11.4f} {kl:>11} {agree:>10}")
    rows.append(f"wall time: {summary['wall_seconds']:.0f} s")
    return "\n".join(rows)


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)
