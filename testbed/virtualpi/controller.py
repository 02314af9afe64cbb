"""A second control machine with the newest ansible-core: Debian 13 amd64 (Python 3.13).

This machine is Debian 12, and its Python 3.11 cannot install ansible-core 2.20 or later (they
need 3.12), so the project's virtualenv has 2.19, the oldest release still maintained. The
newest (constraints.txt pins both) runs here: a Debian 13 root filesystem from debootstrap,
cached like the Pi's, with a virtualenv beside it, run by systemd-nspawn in this machine's own
network, so it reaches the virtual Pis, and with the checkout, /tmp, the caches and the virtual
Pis' keys at the same paths as outside.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

from appliance.control.host import SOURCE, cache_dir, run

from . import rootfs
from .host import state_dir

RELEASE = rootfs.Release(
    name="control machine", suite="trixie", arch="amd64",
    packages=("ca-certificates", "openssh-client", "python3-venv"),
    files={}, commands=(("apt-get", "clean"),), cloud_init=False, default_sudo="",
)
VENV = "/opt/ansible"  # inside the control machine
# This machine's way to the package index, which a control machine on its network shares: its
# trust store (a site's TLS proxy may sign with its own CA) and its proxy settings.
PASSED_ENVIRONMENT = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "HTTP_PROXY",
                      "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def _venv_dir() -> Path:
    """The virtualenv, named by constraints.txt's digest: new pins, new virtualenv."""
    digest = hashlib.sha256((SOURCE / "constraints.txt").read_bytes()).hexdigest()[:12]
    return cache_dir() / "controller" / f"ansible-{digest}"


def nspawn(*command: str, cwd: Path | None = None, venv: Path | None = None) -> list[str]:
    """The command line that runs `command` on the control machine."""
    base = rootfs.ensure_base(RELEASE)
    state_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    binds = {str(SOURCE), tempfile.gettempdir(), str(cache_dir()), str(state_dir())}
    return [
        "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--as-pid2",
        # Changes (mount points, ~/.ansible) go to a tmpfs over the cached tree, gone afterwards.
        f"--directory={base}", "--volatile=overlay", "--resolv-conf=bind-host",
        *[f"--bind={path}" for path in sorted(binds)],
        f"--bind={venv or _venv_dir()}:{VENV}", "--bind-ro=/etc/ssl/certs",
        *[f"--setenv={name}={os.environ[name]}" for name in PASSED_ENVIRONMENT
          if name in os.environ],
        f"--chdir={cwd or SOURCE}", "--setenv=HOME=/root", "--setenv=ANSIBLE_NOCOLOR=1",
        f"--setenv=PATH={VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--", *command,
    ]


def ensure() -> Path:
    """The control machine's virtualenv, with constraints.txt's ansible-core for Python 3.13."""
    venv = _venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            venv.mkdir(exist_ok=True)
            run(*nspawn("python3", "-m", "venv", "--clear", VENV, venv=venv))
            run(*nspawn(f"{VENV}/bin/pip", "install", "--quiet", "--constraint",
                        str(SOURCE / "constraints.txt"), "ansible-core", venv=venv))
            (venv / ".complete").write_text("")
            for older in venv.parent.glob("ansible-*"):
                if older != venv:
                    run("rm", "-rf", "--", older)
    return venv


def ansible_version() -> str:
    ensure()
    return run(*nspawn("ansible-playbook", "--version")).stdout.splitlines()[0]


def command(*argv: str, cwd: Path | None = None) -> list[str]:
    """`ansible-playbook …` (or another Ansible command) as the control machine runs it."""
    ensure()
    return nspawn(*argv, cwd=cwd)
