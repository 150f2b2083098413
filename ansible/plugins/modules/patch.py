#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: the hotpatch developers
# MIT OR Apache-2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: patch
short_description: Apply, accept or revert a hotpatch live patch in a running service
description:
  - Drives the C(hotpatch) tool (C(--json)) on the target host, against one
    process's control endpoint.
  - C(state=applied) applies the patch file (with a watch window if C(watch) is
    set); C(state=accepted) also accepts it (re-applied when the service
    restarts), after its window; C(state=absent) reverts it.
  - Idempotent by the file's bytes, as the service sees them. A patch whose
    bytes are applied already is not applied again (C(changed=false)).
  - In check mode the patch is checked (C(hotpatch check), every check of an
    apply, nothing applied) and the task reports what it would change.
  - A patch that is refused, times out or is rolled back in its watch window
    fails the task with the tool's reason (C(msg)), its exit code (C(rc) and
    C(exit_code)) and
    the service's error (C(reply)).
  - The file must already be on the host, owned by the service's user or
    root and writable by no one else (the service's trust policy), with its
    C(.minisig) beside it if the service requires signatures; the collection's
    rollout playbook copies both.
version_added: "0.1.0"
options:
  path:
    description:
      - The patch file on the target host (absolute, or relative to the
        task's working directory). Required for C(applied) and C(accepted).
      - With C(state=absent), reverts the applied patches loaded from this
        path.
    type: path
  name:
    description:
      - With C(state=absent), reverts the applied patches of this name.
    type: str
  state:
    description: What the process should run.
    type: str
    choices: [applied, accepted, absent]
    default: applied
  watch:
    description:
      - Keep the patch on trial this long (C(60s), C(500ms), C(2m)) when it is
        applied. Panics out of it or a failed health check of the service
        revert it and fail the task (rc 8).
    type: str
  deadline:
    description:
      - How long the transition may wait for the service's threads (at most
        the service's own deadline). Past it nothing changes and the task
        fails (rc 4).
    type: str
  pid:
    description: The process. One of C(pid), C(socket), C(service), or none if the host has one patchable process.
    type: int
  socket:
    description: The process's control socket.
    type: path
  service:
    description: The service name; exactly one process of it must run.
    type: str
  socket_dir:
    description: Where to look for control sockets (the tool's C(--socket-dir)).
    type: path
  executable:
    description: The C(hotpatch) tool.
    type: path
    default: hotpatch
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
author:
  - hotpatch developers
"""

EXAMPLES = r"""
- name: Apply the fix, watch it for a minute, keep it across restarts
  hotpatch.fleet.patch:
    path: /var/lib/hotpatch/patches/pricing-fix.so
    state: accepted
    watch: 60s
    service: pricing

- name: Revert it
  hotpatch.fleet.patch:
    name: pricing-fix
    state: absent
    service: pricing
"""

RETURN = r"""
patch:
  description: The patch as the service reports it (id, name, version, state, file, functions...); null when nothing is applied.
  returned: success
  type: dict
patches:
  description: The process's applied patches after the task.
  returned: success
  type: list
watch:
  description: How the watch window ended (C(outcome), C(window_ms), C(panics), C(check_rounds)).
  returned: when a patch was applied with a watch window
  type: dict
exit_code:
  description: The exit code of the last C(hotpatch) command (0 done, 1 error, 2 usage, 3 refused, 4 timed out, 5 nothing to do, 6 not permitted, 7 no such process, 8 rolled back).
  returned: always
  type: int
rc:
  description: The same exit code, on failure only (Ansible takes a result with a non-zero C(rc) as failed; 5 is not a failure).
  returned: failure
  type: int
outcome:
  description: The exit code's name (C(done), C(refused), C(rolled_back), ...).
  returned: always
  type: str
kind:
  description: The service's error kind (C(rustc_mismatch), C(rolled_back), ...), if any.
  returned: always
  type: str
reply:
  description: The tool's JSON reply (the control protocol's object).
  returned: always
  type: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.hotpatch.fleet.plugins.module_utils.hotpatch_cli import (
    TARGET_EXCLUSIVE,
    TARGET_OPTIONS,
    Cli,
    patch_lines,
)


def by_id(status, pid):
    for p in status.get("patches", []):
        if p.get("id") == pid:
            return p
    return None


def present(module, cli, before):
    p = module.params
    path = os.path.abspath(p["path"])
    accept = p["state"] == "accepted"
    if module.check_mode:
        run = cli.on_target(["check", path])
        if run.rc == 0:
            c = run.reply["check"]
            line = "#? %s %s %s\n" % (c.get("name"), c.get("version"), p["state"])
            return True, None, run, patch_lines(before) + line
        if run.kind == "already_applied":
            applied = by_id(before, run.error["patch"]["id"]) or {}
            changed = accept and applied.get("state") != "accepted"
            after = patch_lines(before)
            if changed:
                after = after.replace(
                    "#%s %s %s applied\n" % (applied["id"], applied["name"], applied["version"]),
                    "#%s %s %s accepted\n" % (applied["id"], applied["name"], applied["version"]),
                )
            return changed, applied, run, after
        cli.fail(run)
    args = ["apply", path]
    if p.get("watch"):
        args += ["--watch", p["watch"]]
    if p.get("deadline"):
        args += ["--deadline", p["deadline"]]
    if accept:
        args.append("--accept")
    run = cli.on_target(args)
    if run.rc == 0:
        return True, run.reply.get("patch"), run, None
    if run.kind != "already_applied":
        cli.fail(run)
    applied = by_id(before, run.error["patch"]["id"])
    if not accept or applied is None or applied.get("state") == "accepted":
        return False, applied, run, None
    run = cli.on_target(["accept", str(applied["id"])])
    if run.rc == 0:
        return True, run.reply.get("patch"), run, None
    if run.rc == 5:
        return False, applied, run, None
    cli.fail(run)


def absent(module, cli, before):
    p = module.params
    path = os.path.abspath(p["path"]) if p.get("path") else None
    matches = [
        x
        for x in before.get("patches", [])
        if (p.get("name") is not None and x.get("name") == p["name"])
        or (path is not None and x.get("file") == path)
    ]
    if not matches:
        return False, None, None, None
    if module.check_mode:
        gone = set(x["id"] for x in matches)
        after = patch_lines(dict(patches=[x for x in before["patches"] if x["id"] not in gone]))
        return True, matches[-1], None, after
    changed = False
    run = None
    for x in matches:
        args = ["revert", str(x["id"])]
        if p.get("deadline"):
            args += ["--deadline", p["deadline"]]
        run = cli.on_target(args)
        if run.rc == 0:
            changed = True
        elif run.rc != 5:
            cli.fail(run)
    return changed, matches[-1], run, None


def main():
    spec = dict(
        path=dict(type="path"),
        name=dict(type="str"),
        state=dict(type="str", default="applied", choices=["applied", "accepted", "absent"]),
        watch=dict(type="str"),
        deadline=dict(type="str"),
    )
    spec.update(TARGET_OPTIONS)
    module = AnsibleModule(
        argument_spec=spec,
        supports_check_mode=True,
        mutually_exclusive=TARGET_EXCLUSIVE,
        required_if=[
            ("state", "applied", ("path",)),
            ("state", "accepted", ("path",)),
            ("state", "absent", ("name", "path"), True),
        ],
    )
    cli = Cli(module)
    before = cli.status()
    if module.params["state"] == "absent":
        changed, patch, run, predicted = absent(module, cli, before)
    else:
        changed, patch, run, predicted = present(module, cli, before)
    if module.check_mode or not changed:
        after_lines = predicted if predicted is not None else patch_lines(before)
        patches = before.get("patches", [])
    else:
        after = cli.status()
        after_lines = patch_lines(after)
        patches = after.get("patches", [])
        if patch is not None:
            patch = by_id(after, patch.get("id")) or patch
    result = dict(
        changed=changed,
        patch=patch,
        patches=patches,
        diff=dict(before=patch_lines(before), after=after_lines),
    )
    if run is not None:
        result.update(run.result())
        if isinstance(run.reply, dict) and run.reply.get("watch") is not None:
            result["watch"] = run.reply["watch"]
    else:
        result.update(exit_code=0, outcome="done", kind=None, reply=None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
