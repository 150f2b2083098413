"""The `patch` and `patch_info` modules against real service processes,
run as Ansible runs a module (a process given its arguments file), from
the collection installed by ansible-galaxy: check mode, diff, idempotence,
`changed`, and every exit code of the `hotpatch` tool mapped to the task
result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

from conftest import BAD_RUSTC, BASIC, hotpatch


def module(collections, name, args, check=False, diff=True):
    """Runs module `name` with `args`; its result (a dict)."""
    params = dict(args)
    params["_ansible_check_mode"] = check
    params["_ansible_diff"] = diff
    env = dict(os.environ)
    env["PYTHONPATH"] = str(collections)
    r = subprocess.run(
        [sys.executable, "-m", "ansible_collections.hotpatch.fleet.plugins.modules." + name],
        input=json.dumps({"ANSIBLE_MODULE_ARGS": params}),
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.stdout.strip(), "no result: %s" % r.stderr
    return json.loads(r.stdout)


def status(built, svc):
    reply, rc = hotpatch(built, "status", "--socket", svc.socket)
    assert rc == 0
    return reply


def test_apply_accept_revert_with_check_mode_diff_and_idempotence(built, services, collections):
    svc = services("unit")
    base = dict(executable=built["hotpatch"], socket=svc.socket)
    so = built[BASIC]
    before = status(built, svc)

    # Check mode: `hotpatch check`, would change, changes nothing.
    r = module(collections, "patch", dict(base, path=so, state="accepted"), check=True)
    assert r["changed"] is True and not r.get("failed"), r
    assert r["diff"]["before"] == ""
    assert r["diff"]["after"] == "#? fixture-patch-basic 1.2.3 accepted\n"
    after = status(built, svc)
    assert after["patches"] == before["patches"] == []

    # Applied: changed, the patch as the service reports it.
    r = module(collections, "patch", dict(base, path=so, state="applied"))
    assert r["changed"] is True and r["exit_code"] == 0 and r["outcome"] == "done", r
    assert r["patch"]["name"] == BASIC and r["patch"]["state"] == "applied"
    assert r["diff"]["after"] == "#1 fixture-patch-basic 1.2.3 applied\n"
    # Again: already applied, rc 5, not changed, not failed.
    r = module(collections, "patch", dict(base, path=so, state="applied"))
    assert r["changed"] is False and r["exit_code"] == 5 and r["outcome"] == "nothing_to_do", r
    assert not r.get("failed") and "rc" not in r
    # Check mode for accepted: would change (applied, not accepted).
    r = module(collections, "patch", dict(base, path=so, state="accepted"), check=True)
    assert r["changed"] is True and r["diff"]["after"] == "#1 fixture-patch-basic 1.2.3 accepted\n", r
    assert status(built, svc)["patches"][0]["state"] == "applied"
    # Accepted: the applied patch is accepted (no second apply).
    r = module(collections, "patch", dict(base, path=so, state="accepted"))
    assert r["changed"] is True and r["patch"]["state"] == "accepted", r
    assert r["patch"]["id"] == 1
    r = module(collections, "patch", dict(base, path=so, state="accepted"))
    assert r["changed"] is False and r["patch"]["state"] == "accepted", r
    r = module(collections, "patch", dict(base, path=so, state="accepted"), check=True)
    assert r["changed"] is False, r

    # Info: the patch, with the build-id it is bound to.
    info = module(collections, "patch_info", base)
    assert info["changed"] is False
    assert [(p["name"], p["state"], p["pid"]) for p in info["patches"]] == [(BASIC, "accepted", svc.pid)]
    assert len(info["patches"][0]["build_id"]) == 40
    assert info["processes"][0]["service"] == "unit"

    # The same state for node_exporter's textfile collector.
    prom = subprocess.run([built["hotpatch"], "status", "--prometheus", "--socket", svc.socket],
                          capture_output=True, text=True, check=True).stdout
    labels = 'service="unit",pid="%d"' % svc.pid
    assert "hotpatch_patches_applied{%s} 1\n" % labels in prom, prom
    assert "hotpatch_patches_accepted{%s} 1\n" % labels in prom, prom
    assert ('hotpatch_patch_info{%s,id="1",name="%s",version="1.2.3",build_id="%s",state="accepted"} 1\n'
            % (labels, BASIC, info["processes"][0]["build_id"])) in prom, prom

    # Absent by name: check mode changes nothing, then reverted, then ok.
    r = module(collections, "patch", dict(base, name=BASIC, state="absent"), check=True)
    assert r["changed"] is True and r["diff"]["after"] == "", r
    assert len(status(built, svc)["patches"]) == 1
    r = module(collections, "patch", dict(base, name=BASIC, state="absent"))
    assert r["changed"] is True and r["exit_code"] == 0, r
    assert status(built, svc)["patches"] == []
    assert status(built, svc)["state"]["accepted"] == [], "reverting also un-accepts"
    r = module(collections, "patch", dict(base, name=BASIC, state="absent"))
    assert r["changed"] is False and not r.get("failed"), r
    # Absent by path.
    module(collections, "patch", dict(base, path=so))
    r = module(collections, "patch", dict(base, path=so, state="absent"))
    assert r["changed"] is True, r
    assert status(built, svc)["patches"] == []


def test_service_option_picks_the_process(built, services, collections, tmp_path):
    a = services("alpha", dir=tmp_path / "a")
    b = services("beta", dir=tmp_path / "b")
    # Both in one socket directory: move b's socket beside a's.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    for s in (a, b):
        os.symlink(s.socket, shared / os.path.basename(s.socket))
    base = dict(executable=built["hotpatch"], socket_dir=str(shared))
    r = module(collections, "patch", dict(base, path=built[BASIC], service="beta"))
    assert r["changed"] is True, r
    assert status(built, b)["patches"][0]["name"] == BASIC
    assert status(built, a)["patches"] == []
    info = module(collections, "patch_info", base)
    assert sorted((p["service"], p["name"]) for p in info["patches"]) == [("beta", BASIC)]
    assert len(info["processes"]) == 2
    # 2: several processes and none picked (the tool's usage error).
    r = module(collections, "patch", dict(base, path=built[BASIC]))
    assert r["failed"] is True and r["rc"] == 2 and r["outcome"] == "usage", r
    assert "choose one with --pid" in r["msg"]
    r = module(collections, "patch", dict(base, path=built[BASIC], service="gamma"))
    assert r["failed"] is True and r["rc"] == 7, r


def fake_service(path):
    """A socket that answers anything with a line that is not JSON."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.recv(65536)
            c.sendall(b"this is not json\n")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_every_exit_code_of_the_tool_maps_to_the_task_result(built, services, collections, tmp_path):
    svc = services("codes")
    sick = services("sick", "--unhealthy-if-answer", "2")
    base = dict(executable=built["hotpatch"], socket=svc.socket)
    seen = {}

    # 0 done: changed.
    r = module(collections, "patch", dict(base, path=built[BASIC]))
    seen[0] = r
    assert r["changed"] is True and not r.get("failed")
    # 5 nothing to do: not failed, not changed.
    r = module(collections, "patch", dict(base, path=built[BASIC]))
    seen[5] = r
    assert r["changed"] is False and not r.get("failed") and r["kind"] == "already_applied"
    module(collections, "patch", dict(base, name=BASIC, state="absent"))

    # 3 refused by a check: failed with the reason, nothing changed.
    r = module(collections, "patch", dict(base, path=built[BAD_RUSTC]))
    seen[3] = r
    assert r["failed"] is True and r["kind"] == "rustc_mismatch", r
    assert r["msg"].startswith("rustc_mismatch: ") and built[BAD_RUSTC] in r["msg"]
    r2 = module(collections, "patch", dict(base, path=built[BAD_RUSTC]), check=True)
    assert r2["failed"] is True and r2["rc"] == 3, "check mode fails a refused patch too"
    assert status(built, svc)["patches"] == []

    # 4 timed out: a registered thread stalled; reversed, nothing applied.
    svc.say("stall")
    r = module(collections, "patch", dict(base, path=built[BASIC], deadline="500ms"))
    svc.say("unstall")
    seen[4] = r
    assert r["failed"] is True and r["kind"] == "timeout", r
    assert r["reply"]["error"]["stalled"][0]["name"] == "stall-worker"
    assert status(built, svc)["patches"] == []

    # 8 rolled back in its watch window: failed with the health check's reason.
    r = module(collections, "patch", dict(executable=built["hotpatch"], socket=sick.socket,
                                          path=built[BASIC], state="accepted", watch="10s"))
    seen[8] = r
    assert r["failed"] is True and r["kind"] == "rolled_back", r
    assert "health check `answer` failed" in r["msg"], r["msg"]
    assert status(built, sick)["patches"] == []
    assert status(built, sick)["state"]["accepted"] == [], "not accepted"

    # 7 no such process: a pid with no control socket.
    r = module(collections, "patch", dict(executable=built["hotpatch"], socket_dir=str(svc.socket_dir),
                                          pid=os.getpid(), path=built[BASIC]))
    seen[7] = r
    assert r["failed"] is True and "no control socket" in r["msg"], r

    # 1 other error: a socket whose reply is not JSON.
    fake = fake_service(tmp_path / "fake.sock")
    r = module(collections, "patch_info", dict(executable=built["hotpatch"], socket=str(tmp_path / "fake.sock")))
    fake.close()
    seen[1] = r
    assert r["failed"] is True and "reply is not JSON" in r["msg"], r

    # 6 not permitted: the tool run as another user (uid 65534).
    wrapper = tmp_path / "as-nobody"
    wrapper.write_text('#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups %s "$@"\n'
                       % built["hotpatch"])
    wrapper.chmod(0o755)
    r = module(collections, "patch", dict(base, executable=str(wrapper), path=built[BASIC]))
    seen[6] = r
    assert r["failed"] is True and "cannot connect" in r["msg"], r

    # 2 usage: see test_service_option_picks_the_process.
    for code, r in seen.items():
        assert r["exit_code"] == code, (code, r)
        # `rc` only on failure: Ansible fails any result with a non-zero rc.
        assert r.get("rc", 0) == (code if code not in (0, 5) else 0), (code, r)
        assert r["outcome"] == {0: "done", 1: "error", 3: "refused", 4: "timed_out", 5: "nothing_to_do",
                                6: "not_permitted", 7: "no_process", 8: "rolled_back"}[code]
        assert bool(r.get("failed")) == (code not in (0, 5))
    assert svc.wrong() == 0 and sick.wrong() == 0


def test_documentation_parses_and_lists_every_option(collections):
    """ansible-doc reads each module's documentation, and it documents
    exactly the options the module accepts."""
    env = dict(os.environ)
    env["ANSIBLE_COLLECTIONS_PATH"] = str(collections)
    r = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ansible-doc"), "--json",
         "hotpatch.fleet.patch", "hotpatch.fleet.patch_info"],
        capture_output=True, text=True, env=env,
    )
    assert r.returncode == 0, r.stderr
    docs = json.loads(r.stdout)
    target = {"pid", "socket", "service", "socket_dir", "executable"}
    assert set(docs["hotpatch.fleet.patch"]["doc"]["options"]) == target | {"path", "name", "state", "watch", "deadline"}
    assert set(docs["hotpatch.fleet.patch_info"]["doc"]["options"]) == target
    # And the modules accept exactly those (an unknown option is refused).
    r = module(collections, "patch_info", dict(executable="/bin/true", bogus=1))
    assert r["failed"] is True and "bogus" in r["msg"], r
