#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: the hotpatch developers
# MIT OR Apache-2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: patch_info
short_description: The hotpatch patches and functions of running services
description:
  - Asks each patchable process on the host (or the one picked by C(pid),
    C(socket) or C(service)) for its status (C(hotpatch status --json)), that is its
    applied patches (id, name, version, state, file, functions), the build-id
    they are bound to, its patchable functions and any transition in
    progress.
  - Changes nothing.
version_added: "0.1.0"
options:
  pid:
    description: Only this process.
    type: int
  socket:
    description: Only the process of this control socket.
    type: path
  service:
    description: Only the processes of this service.
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
author:
  - hotpatch developers
"""

EXAMPLES = r"""
- name: What runs here
  hotpatch.fleet.patch_info:
    service: pricing
  register: hotpatch

- ansible.builtin.debug:
    msg: "{{ hotpatch.processes | map(attribute='patches') | flatten | map(attribute='name') }}"
"""

RETURN = r"""
processes:
  description: The status of each process (the control protocol's C(status) reply), by pid.
  returned: always
  type: list
  elements: dict
patches:
  description: Every applied patch of those processes, each with the C(pid), C(service) and C(build_id) of its process.
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.hotpatch.fleet.plugins.module_utils.hotpatch_cli import (
    TARGET_EXCLUSIVE,
    TARGET_OPTIONS,
    Cli,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(TARGET_OPTIONS),
        supports_check_mode=True,
        mutually_exclusive=TARGET_EXCLUSIVE,
    )
    cli = Cli(module)
    p = module.params
    if p.get("socket") or p.get("pid") is not None:
        statuses = [cli.status()]
    else:
        statuses = []
        for proc in cli.processes():
            if p.get("service") and proc.get("service") != p["service"]:
                continue
            run = cli.run(["status", "--pid", str(proc["pid"])])
            if run.rc == 7:
                continue  # Gone since `ps`.
            if run.rc != 0:
                cli.fail(run)
            statuses.append(run.reply)
    patches = []
    for s in statuses:
        for patch in s.get("patches", []):
            patch = dict(patch)
            patch.update(pid=s.get("pid"), service=s.get("service"), build_id=s.get("build_id"))
            patches.append(patch)
    module.exit_json(changed=False, processes=statuses, patches=patches)


if __name__ == "__main__":
    main()
