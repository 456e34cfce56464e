#!/usr/bin/env python3
"""Run `analogjax distill` on a Cloud TPU pod slice until it completes, through preemptions.

    python launch/tpu_pod.py --tpu my-pod --zone us-east5-a --accelerator v5p-256 --spot \\
        --config configs/pod_llama3-70b_to_1b_v5p-256.yaml --workdir gs://BUCKET/runs/70b-to-1b

What it does, each step a `gcloud` command (`--dry-run` prints them all and runs none):
  1. reuse the TPU VM if it exists and is READY; otherwise create it (or, with --queued, a queued resource, waited
     on until ACTIVE);
  2. copy this checkout (without .git and runs/) to every worker and `pip install -e .[tpu,gcs]` there;
  3. run `analogjax distill` on all workers at once (`--worker=all`); JAX detects the pod, process 0 logs, and
     gcloud streams every worker's output here;
  4. on failure: if the slice was preempted, delete and recreate it, then go back to 2; otherwise relaunch on the
     same slice. Each relaunch resumes from the latest checkpoint in --workdir (so it must outlive the VMs: a
     gs:// bucket or a shared filesystem). Gives up after --max-restarts failures.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A TPU VM runtime image per generation (Cloud TPU's documented software versions for JAX).
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
PREEMPTED_STATES = {"PREEMPTED", "TERMINATED", "SUSPENDED", "SUSPENDING", "FAILED"}


class Gcloud:
    """Runs (or, in a dry run, prints) gcloud commands; every command goes through here."""

    def __init__(self, *, dry_run: bool, project: str | None):
        self.dry_run = dry_run
        self.project = project

    def _full(self, args: list[str]) -> list[str]:
        return ["gcloud", *args, *([f"--project={self.project}"] if self.project else [])]

    def run(self, args: list[str], *, check: bool = True) -> int:
        cmd = self._full(args)
        print("+ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return 0
        code = subprocess.call(cmd)
        if check and code != 0:
            raise SystemExit(f"tpu_pod: command failed with status {code}: {shlex.join(cmd)}")
        return code

    def query(self, args: list[str], *, dry_value: str = "") -> str:
        """A read-only query's stdout ('' when it fails, e.g. the resource does not exist)."""
        cmd = self._full(args)
        print("+ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return dry_value
        done = subprocess.run(cmd, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""


def local_command(cmd: list[str], dry_run: bool) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, check=True)


def pack_code(tarball: str, dry_run: bool) -> None:
    """Tar what travels to the pod: the files git tracks plus new ones it does not ignore. Never a local .venv,
    runs/ or caches, which can be gigabytes."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = [name for name in listing.split("\0") if name and (REPO / name).is_file()]
    print(
        f"+ tar -czf {tarball} -C {REPO} <{len(files)} files: git ls-files --cached --others --exclude-standard>",
        flush=True,
    )
    if not dry_run:
        with tarfile.open(tarball, "w:gz") as archive:
            for name in files:
                archive.add(REPO / name, arcname=name)


class Pod:
    def __init__(self, args: argparse.Namespace, gcloud: Gcloud):
        self.args = args
        self.gcloud = gcloud
        self.where = [f"--zone={args.zone}"]

    def state(self) -> str:
        if self.args.queued:
            return self.gcloud.query(
                [
                    "compute",
                    "tpus",
                    "queued-resources",
                    "describe",
                    self.args.tpu,
                    *self.where,
                    "--format=value(state.state)",
                ]
            )
        return self.gcloud.query(
            ["compute", "tpus", "tpu-vm", "describe", self.args.tpu, *self.where, "--format=value(state)"]
        )

    def ready(self, state: str) -> bool:
        return state in ("READY", "ACTIVE")

    def create(self) -> None:
        a = self.args
        runtime = a.runtime_version or RUNTIMES[a.accelerator.split("-")[0]]
        capacity = ["--spot"] if a.spot else []
        if a.queued:
            self.gcloud.run(
                [
                    "compute",
                    "tpus",
                    "queued-resources",
                    "create",
                    a.tpu,
                    f"--node-id={a.tpu}",
                    *self.where,
                    f"--accelerator-type={a.accelerator}",
                    f"--runtime-version={runtime}",
                    *capacity,
                ]
            )
            self.wait_active()
        else:
            self.gcloud.run(
                [
                    "compute",
                    "tpus",
                    "tpu-vm",
                    "create",
                    a.tpu,
                    *self.where,
                    f"--accelerator-type={a.accelerator}",
                    f"--version={runtime}",
                    *capacity,
                ]
            )

    def wait_active(self) -> None:
        """A queued resource is granted when capacity frees up: poll until ACTIVE."""
        while True:
            state = self.gcloud.query(
                [
                    "compute",
                    "tpus",
                    "queued-resources",
                    "describe",
                    self.args.tpu,
                    *self.where,
                    "--format=value(state.state)",
                ],
                dry_value="ACTIVE",
            )
            if state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED"):
                raise SystemExit(f"tpu_pod: queued resource {self.args.tpu} is {state}")
            print(f"tpu_pod: queued resource is {state or 'not visible yet'}; waiting", flush=True)
            time.sleep(self.args.poll_seconds)

    def delete(self) -> None:
        if self.args.queued:
            self.gcloud.run(
                ["compute", "tpus", "queued-resources", "delete", self.args.tpu, *self.where, "--force", "--quiet"],
                check=False,
            )
        else:
            self.gcloud.run(["compute", "tpus", "tpu-vm", "delete", self.args.tpu, *self.where, "--quiet"], check=False)

    def ensure(self) -> None:
        state = self.state()
        if self.ready(state):
            print(f"tpu_pod: reusing {self.args.tpu} ({state})", flush=True)
            return
        if state:  # exists but not usable (preempted, stopped, failed)
            print(f"tpu_pod: {self.args.tpu} is {state}; recreating it", flush=True)
            self.delete()
        self.create()

    def ssh_all(self, command: str, *, check: bool = True) -> int:
        return self.gcloud.run(
            ["compute", "tpus", "tpu-vm", "ssh", self.args.tpu, *self.where, "--worker=all", f"--command={command}"],
            check=check,
        )

    def sync_and_install(self) -> None:
        tarball = self.args.tarball
        pack_code(tarball, self.gcloud.dry_run)
        self.gcloud.run(
            [
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                tarball,
                f"{self.args.tpu}:analogjax.tar.gz",
                *self.where,
                "--worker=all",
            ]
        )
        self.ssh_all(
            "set -e; rm -rf ~/analogjax && mkdir -p ~/analogjax && tar -xzf ~/analogjax.tar.gz -C "
            "~/analogjax && python3 -m pip install --quiet -e ~/analogjax[tpu,gcs]"
        )

    def distill_command(self) -> str:
        a = self.args
        cli = ["python3", "-m", "analogjax", "distill", "--config", a.config, "--workdir", a.workdir, "--no-progress"]
        for item in a.overrides:
            cli += ["--set", item]
        # Unbuffered so gcloud streams lines as they come; the log file survives on each worker for post-mortems.
        return (
            f"cd ~/analogjax && PYTHONUNBUFFERED=1 {shlex.join(cli)} 2>&1 | tee -a ~/analogjax-distill.log; "
            "exit ${PIPESTATUS[0]}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpu", required=True, help="TPU VM (and queued resource) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--accelerator", required=True, help="e.g. v4-32, v5litepod-64, v5p-256, v6e-256")
    parser.add_argument("--runtime-version", default=None, help="TPU VM image (default: one per generation)")
    parser.add_argument("--spot", action="store_true", help="spot capacity: cheaper, preemptible")
    parser.add_argument("--queued", action="store_true", help="request through a queued resource")
    parser.add_argument("--config", required=True, help="config path relative to the repository root")
    parser.add_argument("--workdir", required=True, help="run directory every worker can reach (gs://... or NFS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-restarts", type=int, default=20)
    parser.add_argument("--poll-seconds", type=float, default=60.0)
    parser.add_argument("--tarball", default="/tmp/analogjax-code.tar.gz")
    parser.add_argument("--dry-run", action="store_true", help="print every command, run none")
    args = parser.parse_args(argv)
    if args.accelerator.split("-")[0] not in RUNTIMES and not args.runtime_version:
        parser.error(f"unknown accelerator family in {args.accelerator!r}; pass --runtime-version")

    pod = Pod(args, Gcloud(dry_run=args.dry_run, project=args.project))
    failures = 0
    while True:
        pod.ensure()
        pod.sync_and_install()
        code = pod.ssh_all(pod.distill_command(), check=False)
        if code == 0:
            print("tpu_pod: run complete", flush=True)
            return 0
        failures += 1
        state = pod.state()
        cause = "preempted" if state in PREEMPTED_STATES or not state else f"failed (exit {code}, slice {state})"
        print(f"tpu_pod: attempt {failures} {cause}", flush=True)
        if failures > args.max_restarts:
            print(f"tpu_pod: giving up after {failures} failures", file=sys.stderr)
            return 1
        # A healthy slice is reused as is; `ensure` recreates a preempted one. Either way the run resumes from
        # its latest checkpoint in --workdir.


if __name__ == "__main__":
    sys.exit(main())
