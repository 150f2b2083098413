# -*- coding: utf-8 -*-
# Copyright: the hotpatch developers
# MIT OR Apache-2.0

"""Runs the ``hotpatch`` tool with ``--json`` on the target host.

Shared by the ``patch`` and ``patch_info`` modules: the options that pick
the process, the command line, the reply, and what each of the tool's
exit codes means for a task.
"""

from __future__ import annotations

import json

# Every exit code of `hotpatch` (see `hotpatch --help`): its name in the
# task result, and whether the task fails. 5 ("nothing to do": already
# applied or accepted, or not applied) is the state asked for: the task
# succeeds with changed=false.
EXIT_CODES = {
    0: ("done", False),
    1: ("error", True),
    2: ("usage", True),
    3: ("refused", True),
    4: ("timed_out", True),
    5: ("nothing_to_do", False),
    6: ("not_permitted", True),
    7: ("no_process", True),
    8: ("rolled_back", True),
}

# The options that pick the process, common to both modules.
TARGET_OPTIONS = dict(
    pid=dict(type="int"),
    socket=dict(type="path"),
    service=dict(type="str"),
    socket_dir=dict(type="path"),
    executable=dict(type="path", default="hotpatch"),
)

TARGET_EXCLUSIVE = [("pid", "socket", "service")]


class Run:
    """One run of the tool: its exit code, reply and output."""

    def __init__(self, cmd, rc, stdout, stderr):
        self.cmd = cmd
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.reply = None
        text = stdout.strip()
        if text:
            try:
                self.reply = json.loads(text.splitlines()[0])
            except ValueError:
                self.reply = None
        self.outcome, self.failed = EXIT_CODES.get(rc, ("error", True))

    @property
    def error(self):
        if isinstance(self.reply, dict) and isinstance(self.reply.get("error"), dict):
            return self.reply["error"]
        return None

    @property
    def kind(self):
        return self.error.get("kind") if self.error else None

    def reason(self):
        """The tool's reason, one line: the service's error, or the tool's own."""
        if self.error:
            return "%s: %s" % (self.error.get("kind"), self.error.get("message"))
        line = self.stderr.strip().splitlines()
        if line:
            return line[-1]
        return "hotpatch exited with %s" % self.rc

    def result(self):
        """What a task result carries of this run."""
        return dict(
            exit_code=self.rc,
            outcome=self.outcome,
            kind=self.kind,
            cmd=self.cmd,
            reply=self.reply,
            stderr=self.stderr,
        )


class Cli:
    """The tool on this host, aimed at the process the options pick."""

    def __init__(self, module):
        self.module = module
        p = module.params
        self.exe = module.get_bin_path(p["executable"], required=True)
        self.global_args = ["--json"]
        if p.get("socket_dir"):
            self.global_args += ["--socket-dir", p["socket_dir"]]
        self._target = None

    def run(self, args):
        cmd = [self.exe] + self.global_args + list(args)
        rc, out, err = self.module.run_command(cmd)
        return Run(cmd, rc, out, err)

    def fail(self, run, **extra):
        """Fails the task with the tool's reason and exit code."""
        result = run.result()
        result.update(extra)
        # `rc` as Ansible's command modules report it; only on failure
        # (Ansible takes any result with a non-zero `rc` as failed, and
        # exit code 5 is not a failure).
        self.module.fail_json(msg=run.reason(), rc=run.rc, **result)

    def processes(self):
        run = self.run(["ps"])
        if run.rc != 0 or not isinstance(run.reply, dict):
            self.fail(run)
        return run.reply.get("processes", [])

    def target(self):
        """The arguments that pick the process: --socket, --pid, or the one
        process of `service` (by `hotpatch ps`); none to let the tool take
        the only patchable process."""
        if self._target is not None:
            return self._target
        p = self.module.params
        if p.get("socket"):
            self._target = ["--socket", p["socket"]]
        elif p.get("pid") is not None:
            self._target = ["--pid", str(p["pid"])]
        elif p.get("service"):
            found = [x for x in self.processes() if x.get("service") == p["service"]]
            if len(found) != 1:
                pids = ", ".join(str(x.get("pid")) for x in found)
                rc = 7 if not found else 2
                self.module.fail_json(
                    msg="%d patchable processes of service %s%s; choose one with pid or socket"
                    % (len(found), p["service"], " (%s)" % pids if pids else ""),
                    rc=rc,
                    exit_code=rc,
                    outcome=EXIT_CODES[rc][0],
                    kind=None,
                )
            self._target = ["--pid", str(found[0]["pid"])]
        else:
            self._target = []
        return self._target

    def on_target(self, args):
        return self.run(list(args) + self.target())

    def status(self):
        run = self.on_target(["status"])
        if run.rc != 0 or not isinstance(run.reply, dict):
            self.fail(run)
        return run.reply


def patch_lines(status):
    """The applied patches of a status reply, one line each (for diffs)."""
    return "".join(
        "#%s %s %s %s\n" % (p.get("id"), p.get("name"), p.get("version"), p.get("state"))
        for p in (status or {}).get("patches", [])
    )
