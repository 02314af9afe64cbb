"""Commands the control machine runs for the user (ssh, ansible-playbook, builds)."""

from __future__ import annotations

import os
import sys

from appliance.control.host import run


def test_a_command_never_inherits_a_stdin_that_ssh_beside_it_made_non_blocking():
    # ssh sets O_NONBLOCK on the stdin it inherits while it runs; the open file is shared, so
    # an ansible-playbook started beside it would refuse to start ("Ansible requires blocking
    # IO on stdin"): a CI run failed so.
    reading, writing = os.pipe()
    saved = os.dup(0)
    try:
        os.dup2(reading, 0)
        os.set_blocking(0, False)
        child = run(sys.executable, "-c", "import os, sys; print(os.get_blocking(0), "
                                          "repr(sys.stdin.read()))")
    finally:
        os.dup2(saved, 0)
        for fd in (saved, reading, writing):
            os.close(fd)
    assert child.stdout.split() == ["True", "''"]  # blocking, and nothing of ours to read
