"""Fixtures of the collection's tests: real service processes, real patch
files, the collection installed as users install it.

The service is `tests/fixtures/control-svc` (the control endpoint on; a
registered worker serving through patchable functions of `fixture-svc`;
`--unhealthy-if-answer 2` registers a health check that fails while the
basic patch is applied; `stall` on its stdin stops a registered thread at
no safepoint). The patches are the fixture patch crates, linked against that binary with
`cargo hotpatch build`, as an operator builds them.

Nothing is built twice: the tools (`hotpatch`, `cargo-hotpatch`) are the
workspace's test build (`cargo test --workspace --no-run`, which CI has
just run: a no-op there), and the service and the patch crates are the
build `hotpatch-cli/tests/common/mod.rs` makes, in the same selection, target
directory and profile (`target/fixtures`, no debug info), so that the
patches' symbol names are the binary's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "target" / "fixtures"
# The selection hotpatch-cli/tests/common/mod.rs builds its fixtures in.
PACKAGES = [
    "fixture-control-svc",
    "fixture-patch-basic",
    "fixture-patch-replace-v1",
    "fixture-patch-replace-v2",
    "fixture-patch-bad-rustc",
    "fixture-patch-watch-panic",
]
BASIC = "fixture-patch-basic"
BAD_RUSTC = "fixture-patch-bad-rustc"
WATCH_PANIC = "fixture-patch-watch-panic"
# A guard against hangs only: nothing here asserts on time.
GUARD = 60


def cargo_env():
    env = dict(os.environ)
    env["CARGO_TARGET_DIR"] = str(TARGET)
    # No debug info: smaller patches, faster links (as the Rust tests build them).
    env["CARGO_PROFILE_DEV_DEBUG"] = "0"
    return env


def selection(first):
    args = ["-p", first]
    for p in PACKAGES:
        if p != first:
            args += ["-p", p]
    return args


@pytest.fixture(scope="session")
def built(request):
    """The binaries and the patch files: {"service", "hotpatch", PATCH: path}."""
    cargo = os.environ.get("CARGO", "cargo")
    subprocess.run([cargo, "test", "--workspace", "--no-run", "--quiet"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(
        [cargo, "build", "--quiet"] + selection(PACKAGES[0]),
        cwd=ROOT,
        env=cargo_env(),
        check=True,
    )
    tools = ROOT / "target" / "debug"
    debug = TARGET / "debug"
    # A directory every user can search (the not-permitted case runs the
    # tool as uid 65534), holding the tool and the patches, mode 0755.
    base = Path(tempfile.mkdtemp(prefix="hotpatch-fleet-", dir="/tmp"))
    os.chmod(base, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    out = {"service": str(debug / "control-svc")}
    tool = base / "hotpatch"
    shutil.copy2(tools / "hotpatch", tool)
    os.chmod(tool, 0o755)
    out["hotpatch"] = str(tool)
    for patch in (BASIC, BAD_RUSTC, WATCH_PANIC):
        so = base / (patch.replace("-", "_") + ".so")
        subprocess.run(
            [str(tools / "cargo-hotpatch"), "hotpatch", "build"]
            + selection(patch)
            + ["--binary", out["service"], "-o", str(so)],
            cwd=ROOT,
            env=cargo_env(),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        os.chmod(so, 0o644)
        out[patch] = str(so)
    return out


class Service:
    """A running control-svc: its socket, pid, logs; `say` writes a command."""

    def __init__(self, built, dir, name, args=()):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.socket_dir = self.dir / "sock"
        self.state_dir = self.dir / "state"
        self.out = open(self.dir / "stdout", "w")
        self.err = open(self.dir / "stderr", "w")
        env = dict(os.environ)
        env.pop("HOTPATCH_DISABLE", None)
        self.proc = subprocess.Popen(
            [built["service"], "--socket-dir", str(self.socket_dir), "--name", name,
             "--state-dir", str(self.state_dir)] + list(args),
            stdin=subprocess.PIPE,
            stdout=self.out,
            stderr=self.err,
            env=env,
            text=True,
        )
        self.pid = self.proc.pid
        start = time.monotonic()
        self.socket = None
        while self.socket is None:
            for line in (self.dir / "stdout").read_text().splitlines():
                if line.startswith("ready "):
                    self.socket = line[len("ready "):]
            assert self.proc.poll() is None, "the service exited: %s" % (self.dir / "stderr").read_text()
            assert time.monotonic() - start < GUARD, "the service did not start"
            time.sleep(0.02)

    def say(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wrong(self):
        """The last `served N wrong W panicked P` line's W."""
        lines = [l for l in (self.dir / "stdout").read_text().splitlines() if l.startswith("served ")]
        return int(lines[-1].split()[3]) if lines else 0

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.say("quit")
                self.proc.stdin.close()
                self.proc.wait(timeout=GUARD)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        self.err.close()
        return self.proc.returncode


@pytest.fixture
def services(built, tmp_path):
    """Starts services: `services(name, *args)`; all stopped at the end,
    each checked to have exited 0 (no wrong answer served)."""
    started = []

    def start(name, *args, dir=None):
        s = Service(built, dir or tmp_path / name, name, args)
        started.append(s)
        return s

    yield start
    codes = {s.dir.name: s.stop() for s in started}
    assert all(c == 0 for c in codes.values()), "a service served wrong answers: %s" % codes


def hotpatch(built, *args):
    """The tool's JSON reply (stdout), exit code."""
    r = subprocess.run([built["hotpatch"], "--json"] + list(args), capture_output=True, text=True)
    return (json.loads(r.stdout) if r.stdout.strip() else None), r.returncode


@pytest.fixture(scope="session")
def collections(tmp_path_factory):
    """The collection installed with ansible-galaxy from the checkout:
    the directory to put on ANSIBLE_COLLECTIONS_PATH and PYTHONPATH."""
    dest = tmp_path_factory.mktemp("collections")
    subprocess.run(
        [shutil.which("ansible-galaxy") or str(Path(sys.executable).parent / "ansible-galaxy"),
         "collection", "install", "--force", str(ROOT / "ansible"), "-p", str(dest)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    assert (dest / "ansible_collections" / "hotpatch" / "fleet" / "plugins" / "modules" / "patch.py").exists()
    return dest
