"""The collection's playbooks with the real ansible-playbook, over six real
service processes, each its own inventory host (`ansible_connection:
local`, each with its own socket): check mode, a good rollout (canary
first, batches in order, by the services' own event logs; a second run
changes nothing), the fleet report, the rollback playbook (idempotent),
and a patch that fails its watch window on the third host (rolled back
there, the rollout stops, hosts four to six never see it, the playbook
fails with the reason)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BASIC, hotpatch

HOSTS = ["h1", "h2", "h3", "h4", "h5", "h6"]
RECAP = re.compile(r"^(h\d)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+"
                   r"skipped=(\d+)\s+rescued=(\d+)", re.M)


class Fleet:
    def __init__(self, built, services, collections, tmp_path, sick=None):
        self.built = built
        self.collections = collections
        self.tmp = tmp_path
        self.svc = {}
        for h in HOSTS:
            args = ("--unhealthy-if-answer", "2") if h == sick else ()
            self.svc[h] = services(h, *args, dir=tmp_path / h)
        hosts = {}
        for h in HOSTS:
            patches = tmp_path / h / "patches"
            patches.mkdir(mode=0o755)
            hosts[h] = dict(hotpatch_socket=self.svc[h].socket, hotpatch_patch_dir=str(patches))
        inventory = dict(all=dict(
            vars=dict(ansible_connection="local", ansible_python_interpreter=sys.executable,
                      hotpatch_executable=built["hotpatch"], hotpatch_watch="1s"),
            hosts=hosts,
            children=dict(canary=dict(hosts=dict(h1={}))),
        ))
        self.inventory = tmp_path / "inventory.json"
        self.inventory.write_text(json.dumps(inventory))

    def play(self, playbook, *args):
        env = dict(os.environ)
        env["ANSIBLE_COLLECTIONS_PATH"] = str(self.collections)
        env["ANSIBLE_NOCOLOR"] = "1"
        env["ANSIBLE_FORCE_COLOR"] = "0"
        env["ANSIBLE_LOCAL_TEMP"] = str(self.tmp / "ansible-local")
        env["ANSIBLE_REMOTE_TEMP"] = str(self.tmp / "ansible-remote")
        # One worker per host; modules piped to the interpreter, not copied.
        env["ANSIBLE_FORKS"] = str(len(HOSTS))
        env["ANSIBLE_PIPELINING"] = "1"
        t0 = time.monotonic()
        r = subprocess.run(
            [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory),
             "hotpatch.fleet." + playbook] + list(args),
            capture_output=True, text=True, env=env,
        )
        # Shown with a failure's output (a figure, not an assertion).
        print("ansible-playbook %s %s: %.1f s" % (playbook, " ".join(args), time.monotonic() - t0), file=sys.stderr)
        recap = {m.group(1): dict(ok=int(m.group(2)), changed=int(m.group(3)), failed=int(m.group(5)),
                                  rescued=int(m.group(7)))
                 for m in RECAP.finditer(r.stdout)}
        return r, recap

    def status(self, h):
        reply, rc = hotpatch(self.built, "status", "--socket", self.svc[h].socket)
        assert rc == 0
        return reply

    def events(self, h):
        reply, rc = hotpatch(self.built, "events", "--socket", self.svc[h].socket)
        assert rc == 0
        return reply["events"]

    def patches(self, h):
        return [(p["name"], p["state"]) for p in self.status(h)["patches"]]


def applied_at(events):
    return [e["at_ms"] for e in events if e["op"] == "apply" and e["outcome"] == "ok"]


@pytest.fixture
def fleet(built, services, collections, tmp_path):
    return lambda sick=None: Fleet(built, services, collections, tmp_path, sick)


def test_check_rollout_report_rollback(fleet, built, tmp_path):
    f = fleet()
    patch = "patch_file=" + built[BASIC]

    # Check mode: every host checked, nothing applied anywhere.
    r, recap = f.play("rollout", "--check", "-e", patch)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(recap) == HOSTS
    for h in HOSTS:
        assert f.patches(h) == [], h
        ops = [(e["op"], e["outcome"]) for e in f.events(h)]
        assert ops == [("listen", "ok"), ("check", "ok")], (h, ops)

    # The rollout: every host applied and accepted.
    r, recap = f.play("rollout", "-e", patch)
    assert r.returncode == 0, r.stdout + r.stderr
    for h in HOSTS:
        assert f.patches(h) == [(BASIC, "accepted")], h
        assert recap[h]["changed"] >= 1 and recap[h]["failed"] == 0, (h, recap)
    # The canary first, then the batches [1, 25%, 100%] of the other five:
    # h2, then h3, then h4-h6; by when each service applied it.
    at = {h: applied_at(f.events(h)) for h in HOSTS}
    assert all(len(at[h]) == 1 for h in HOSTS), at
    batches = [["h1"], ["h2"], ["h3"], ["h4", "h5", "h6"]]
    for earlier, later in zip(batches, batches[1:]):
        assert max(at[h][0] for h in earlier) < min(at[h][0] for h in later), (earlier, later, at)

    # Again: nothing changes.
    r, recap = f.play("rollout", "-e", patch)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {h: recap[h]["changed"] for h in HOSTS} == {h: 0 for h in HOSTS}, r.stdout
    assert all(len(applied_at(f.events(h))) == 1 for h in HOSTS)

    # The fleet report: every host's patch, with the build-id it is bound to.
    report = tmp_path / "report.json"
    r, _ = f.play("report", "-e", "patch_name=" + BASIC, "-e", "report_file=" + str(report))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(report.read_text())
    build_id = f.status("h1")["build_id"]
    assert sorted((p["host"], p["pid"], p["name"], p["version"], p["state"], p["build_id"]) for p in rows["patches"]) == [
        (h, f.svc[h].pid, BASIC, "1.2.3", "accepted", build_id) for h in HOSTS
    ]
    assert rows["missing"] == []
    assert "h4  pid %d  #1 %s 1.2.3  build-id %s  accepted" % (f.svc["h4"].pid, BASIC, build_id) in r.stdout
    assert "missing %s: none" % BASIC in r.stdout

    # Rollback everywhere, then again: nothing to do.
    r, recap = f.play("rollback", "-e", "patch_name=" + BASIC)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {h: recap[h]["changed"] for h in HOSTS} == {h: 1 for h in HOSTS}, r.stdout
    for h in HOSTS:
        assert f.patches(h) == [], h
        assert f.status(h)["state"]["accepted"] == [], h
    r, recap = f.play("rollback", "-e", "patch_name=" + BASIC)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {h: recap[h]["changed"] for h in HOSTS} == {h: 0 for h in HOSTS}, r.stdout

    # The report now: every host misses it.
    r, _ = f.play("report", "-e", "patch_name=" + BASIC, "-e", "report_file=" + str(report))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(report.read_text()) == {"patches": [], "missing": HOSTS}


def test_a_patch_failing_its_watch_on_the_third_host_stops_the_rollout(fleet, built):
    f = fleet(sick="h3")
    r, recap = f.play("rollout", "-e", "patch_file=" + built[BASIC])
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "rollout of %s stopped on h3 (exit code 8): rolled_back:" % os.path.basename(built[BASIC]) in out, out
    assert "health check `answer` failed" in out, out
    # The canary and the first batch keep it; the third host rolled it back.
    assert f.patches("h1") == [(BASIC, "accepted")]
    assert f.patches("h2") == [(BASIC, "accepted")]
    assert f.patches("h3") == []
    assert f.status("h3")["state"]["accepted"] == []
    ops = [(e["op"], e["outcome"]) for e in f.events("h3")]
    assert ops == [("listen", "ok"), ("apply", "ok"), ("rollback", "rolled_back")], ops
    assert recap["h3"]["failed"] == 1, recap
    # Hosts four to six never saw the patch: no check, no apply.
    for h in ("h4", "h5", "h6"):
        assert f.patches(h) == [], h
        assert [e["op"] for e in f.events(h)] == ["listen"], h
        assert h not in recap or recap[h]["ok"] == 0, (h, recap)
