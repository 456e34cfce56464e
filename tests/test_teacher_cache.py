"""Teacher cache: multi-process writes, restart after a kill, cached distillation = live distillation, refusals."""

import json
import re
import shutil

import numpy as np
import pytest
import yaml

from analogjax import cli, train
from analogjax import mesh as mesh_lib
from analogjax.config import load_config
from analogjax.data import make_batch_iterator
from analogjax.errors import UserError
from analogjax.teacher import load_teacher
from analogjax.teacher_cache import (
    CacheLayout,
    CacheReader,
    build_cache,
    data_bytes_per_token,
    read_arrays,
    read_provenance,
    write_cache,
)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _corpus(directory) -> str:
    rng = np.random.default_rng(0)
    path = directory / "corpus.jsonl"
    docs = [" ".join(rng.choice(WORDS, rng.integers(4, 30))) for _ in range(300)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def _overrides(corpus: str, steps: int = 2, cache: str | None = None) -> list[str]:
    out = [
        "model.preset=tiny",
        "teacher.model.preset=tiny-teacher",
        "data.global_batch=8",
        "data.seq_len=32",
        f"train.steps={steps}",
        "train.log_every=1",
        "optim.warmup_steps=0",
        "distill.chunk_size=64",
        "data.heldout_fraction=0",
        "mesh.data=4",
        "mesh.tensor=2",
        "checkpoint.async_save=false",
        f"data.sources=[{{path: '{corpus}'}}]",
    ]
    return out + ([f"teacher.cache={cache}"] if cache else [])


def _config(corpus, **kwargs):
    extra = kwargs.pop("extra", [])
    return load_config(None, _overrides(corpus, **kwargs) + list(extra))


def _teacher(config, mesh):
    return load_teacher(config, mesh)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_two_processes_write_what_one_writes(tmp_path, kind):
    """Processes 0 and 1 of 2, each writing its own rows, give the cache one writer gives for the same global
    batches (sampling keys follow the global row, so samples match too)."""
    corpus = _corpus(tmp_path)
    config = _config(corpus)
    layout = CacheLayout(kind=kind, k=8)
    mesh = mesh_lib.make_mesh(4, 1, 2)
    teacher, params = _teacher(config, mesh)
    for process in (0, 1):
        summary = build_cache(
            config,
            layout,
            tmp_path / "two",
            mesh=mesh,
            teacher=teacher,
            teacher_params=params,
            process_index=process,
            process_count=2,
            progress=False,
        )
        assert summary["written_steps"] == [0, 1]
    assert summary["complete"]
    streams = [
        make_batch_iterator(
            config.data, split="train", seed=config.train.seed, vocab_size=512, process_index=p, process_count=2
        )
        for p in (0, 1)
    ]
    global_batches = ({k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*streams))
    write_cache(
        config,
        tmp_path / "one",
        layout,
        global_batches,
        teacher=teacher,
        teacher_params=params,
        mesh=mesh,
        process_index=0,
        process_count=1,
        progress=False,
    )
    two, one = read_arrays(tmp_path / "two"), read_arrays(tmp_path / "one")
    assert two["done"].all() and one["done"].all()
    np.testing.assert_array_equal(two["row_hash"], one["row_hash"])
    if kind == "topk":
        np.testing.assert_array_equal(two["indices"], one["indices"])
        np.testing.assert_allclose(two["values"].astype(np.float32), one["values"].astype(np.float32), rtol=1e-2)
        np.testing.assert_allclose(two["lse"], one["lse"], rtol=1e-5)
        assert (np.diff(two["values"].astype(np.float32), axis=-1) <= 0).all()  # top-k comes sorted
    else:
        np.testing.assert_array_equal(two["ids"], one["ids"])
        np.testing.assert_allclose(two["weights"], one["weights"], rtol=1e-5)
        # Proposal = target: every weight is 1/s, so they sum to one per token.
        np.testing.assert_allclose(two["weights"].sum(-1), 1.0, rtol=1e-5)


def test_restart_after_kill_skips_finished_steps_and_matches(tmp_path):
    corpus = _corpus(tmp_path)
    config = _config(corpus, steps=3)
    layout = CacheLayout(kind="topk", k=8, codec="zstd")
    mesh = mesh_lib.make_mesh(4, 1, 2)
    teacher, params = _teacher(config, mesh)
    kwargs = dict(mesh=mesh, teacher=teacher, teacher_params=params, progress=False)
    build_cache(config, layout, tmp_path / "fresh", **kwargs)

    cut = tmp_path / "cut"
    first = build_cache(config, layout, cut, stop_after=1, **kwargs)
    assert first["written_steps"] == [0] and not first["complete"]
    # A kill between step 1's data and its marker: rows on disk, no marker. It must neither count nor survive.
    arrays = read_arrays(cut)
    import tensorstore as ts

    values = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(cut / "values")}}).result()
    values[1].write(np.full(values[1].shape, 7.0, dtype=arrays["values"].dtype)).result()
    cached = _config(corpus, steps=3, cache=str(cut))
    with pytest.raises(UserError, match="incomplete: step 1"):
        CacheReader(cached)

    resumed = build_cache(config, layout, cut, **kwargs)
    assert resumed["written_steps"] == [1, 2] and resumed["skipped_steps"] == 1 and resumed["complete"]
    fresh, again = read_arrays(tmp_path / "fresh"), read_arrays(cut)
    for name in fresh:
        np.testing.assert_array_equal(again[name], fresh[name], err_msg=name)
    # zstd shrinks the layout below its raw 8·2 + 8·4 + 4 bytes per token.
    assert data_bytes_per_token(cut) < layout.bytes_per_token() == 52


def test_cached_dense_teacher_reproduces_live_distillation(tmp_path):
    """k = vocab with float32 values: tail_bucket and gathered are both exact forward KL, so the first step's loss
    and gradient norm equal the live teacher's."""
    corpus = _corpus(tmp_path)
    live = train.run_training(_config(corpus, steps=1), tmp_path / "live", progress=False)
    cache = tmp_path / "dense"
    build_cache(
        _config(corpus, steps=1), CacheLayout(kind="topk", k=512, values_dtype="float32"), cache, progress=False
    )
    for treatment in ("tail_bucket", "gathered"):
        config = _config(corpus, steps=1, cache=str(cache), extra=[f"distill.topk_treatment={treatment}"])
        got = train.run_training(config, tmp_path / f"cached_{treatment}", progress=False)
        assert got["run"].teacher_params is None and got["run"].teacher.from_batch is not None
        for key in ("loss", "ce", "term_0_forward_kl"):
            np.testing.assert_allclose(got["train"][key], live["train"][key], rtol=1e-5, err_msg=(treatment, key))
        np.testing.assert_allclose(got["train"]["grad_norm"], live["train"]["grad_norm"], rtol=1e-4)
        np.testing.assert_allclose(got["train"]["agreement"], live["train"]["agreement"])


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    """A small top-k cache written through the CLI, and the YAML config that wrote it."""
    directory = tmp_path_factory.mktemp("cli")
    corpus = _corpus(directory)
    config_file = directory / "run.yaml"
    raw = {}
    for item in _overrides(corpus, steps=2, cache=str(directory / "cache")):
        key, _, value = item.partition("=")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    config_file.write_text(yaml.safe_dump(raw))
    assert cli.main(["cache-teacher", "--config", str(config_file), "--k", "8", "--no-progress"]) == 0
    return directory, config_file, corpus


def test_cli_cache_layout_bytes_and_provenance(cli_cache, capsys):
    directory, config_file, _ = cli_cache
    cache = directory / "cache"
    meta = read_provenance(cache)
    assert meta["layout"] == {"kind": "topk", "k": 8, "values_dtype": "bfloat16", "codec": "raw"}
    assert meta["seq_len"] == 32 and meta["global_batch"] == 8 and meta["steps"] == 2
    assert meta["teacher"]["weights"] == "random-init:seed=1" and meta["tokenizer"]["spec"] == "bytes"
    assert data_bytes_per_token(cache) == CacheLayout(k=8).bytes_per_token() == 52
    # Running it again finds every step done.
    assert cli.main(["cache-teacher", "--config", str(config_file), "--k", "8", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_steps"] == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.seq_len=16", "sequence length"),
        ("data.global_batch=16", r"batch \(data.global_batch\)"),
        ("train.seed=5", "corpus spec or seed"),
        ("data.add_eos=false", "corpus spec or seed"),
        ("train.steps=3", "covers 2 steps"),
        ("distill.temperature=1.0", "temperature 2.0"),
        ("distill.terms=[{kind: reverse_kl}]", "reverse_kl needs the teacher's full outputs"),
        ("distill.topk_treatment=bogus", "distill.topk_treatment must be one of"),
    ],
)
def test_mismatched_cache_is_refused(cli_cache, capsys, tmp_path, override, message):
    _, config_file, _ = cli_cache
    status = cli.main(
        [
            "distill",
            "--config",
            str(config_file),
            "--set",
            override,
            "--no-progress",
            "--workdir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_epochs_over_the_cache_read_its_rows_again_and_resume_mid_epoch(cli_cache, capsys, tmp_path):
    """data.epoch_steps=2 over the 2-step cache: 5 steps read batches 0 1 0 1 0 and their cached rows (a wrong
    batch would fail the rows' hashes). A run resumed from step 3 (mid-epoch) logs the same losses to the bit."""
    _, config_file, _ = cli_cache

    def distill(workdir, *extra):
        sets = ["train.steps=5", "data.epoch_steps=2", "checkpoint.every=1", "checkpoint.keep=10", *extra]
        argv = ["distill", "--config", str(config_file), "--no-progress", "--workdir", str(workdir)]
        return cli.main(argv + [arg for key in sets for arg in ("--set", key)])

    assert distill(tmp_path / "whole") == 0
    whole = _losses(tmp_path / "whole")
    assert sorted(whole) == [1, 2, 3, 4, 5] and len(set(whole.values())) == 5  # every step trained
    assert distill(tmp_path / "cut") == 0
    for step in (4, 5):  # a run killed after step 3's checkpoint
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / str(step))
    assert distill(tmp_path / "cut") == 0
    assert _losses(tmp_path / "cut") == whole
    # Three epochs of two steps need the cache's two steps; a third distinct step is refused, naming the key.
    assert distill(tmp_path / "three", "data.epoch_steps=3") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "covers 2 steps but data.epoch_steps is 3" in err, err


def test_other_tokenizer_packing_or_corpus_refused(cli_cache, tmp_path):
    directory, config_file, corpus = cli_cache
    copy = tmp_path / "cache"
    shutil.copytree(directory / "cache", copy)
    config = load_config(config_file, [f"teacher.cache={copy}"])
    with pytest.raises(UserError, match="packing"):
        CacheReader(config, process_count=2)
    moved = tmp_path / "corpus.jsonl"
    shutil.copy(corpus, moved)
    with pytest.raises(UserError, match="corpus spec"):
        CacheReader(load_config(config_file, [f"teacher.cache={copy}", f"data.sources=[{{path: '{moved}'}}]"]))
    meta = read_provenance(copy)
    meta["tokenizer"] = {"spec": "other.json", "hash": "0123456789abcdef"}
    (copy / "provenance.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="different tokenizer"):
        CacheReader(config)


def test_changed_corpus_contents_refused_row_by_row(cli_cache, tmp_path):
    """Same spec, other bytes: the row hashes catch what the provenance cannot."""
    directory, config_file, corpus = cli_cache
    config = load_config(config_file)
    reader = CacheReader(config)
    stream = make_batch_iterator(config.data, split="train", seed=config.train.seed, vocab_size=512)
    batch = next(stream)
    added = reader.add_to(0, batch)
    assert added["teacher_values"].shape == (8, 32, 8) and added["teacher_lse"].shape == (8, 32)
    altered = dict(batch, tokens=batch["tokens"].copy())
    altered["tokens"][3, 5] += 1
    with pytest.raises(UserError, match="row 3 holds other tokens"):
        reader.add_to(0, altered)


def test_damaged_chunks_refused_naming_the_step_and_rewritten(cli_cache, tmp_path, capsys):
    """A chunk cut short, one zero-filled, one with a flipped byte: each read is refused naming its step and the
    command that rewrites it; `analogjax check` lists them; cache-teacher rewrites them as they were."""
    directory, config_file, _ = cli_cache
    copy = tmp_path / "cache"
    shutil.copytree(directory / "cache", copy)
    want = read_arrays(copy)
    for name, chunk, how in [
        ("values", "0.0.0.0", "truncate"),
        ("indices", "1.0.0.0", "zero"),
        ("lse", "1.0.0", "flip"),
    ]:
        data = bytearray((copy / name / chunk).read_bytes())
        data = {"truncate": data[: len(data) // 2], "zero": bytearray(len(data))}.get(how, data)
        if how == "flip":
            data[len(data) // 2] ^= 1
        (copy / name / chunk).write_bytes(bytes(data))
    config = load_config(config_file, [f"teacher.cache={copy}"])
    reader = CacheReader(config)
    stream = make_batch_iterator(config.data, split="train", seed=config.train.seed, vocab_size=512)
    with pytest.raises(
        UserError, match=f"teacher cache {copy}: step 0 is damaged: a chunk is unreadable.*cache-teacher"
    ):
        reader.add_to(0, next(stream))
    with pytest.raises(UserError, match=f"step 1 is damaged: indices, lse chunks changed.*--out {copy}"):
        reader.add_to(1, next(stream))
    stream.close()
    assert cli.main(["check", str(copy)]) == 1
    assert "0 step(s) intact, 2 damaged" in capsys.readouterr().out

    assert (
        cli.main(["cache-teacher", "--config", str(config_file), "--out", str(copy), "--k", "8", "--no-progress"]) == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written_steps"] == 2
    got = read_arrays(copy)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert cli.main(["check", str(copy)]) == 0
