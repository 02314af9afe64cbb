"""A virtual Raspberry Pi 5 on this machine.

An arm64 Debian 12 root filesystem booted with systemd as PID 1 by systemd-nspawn under
qemu-user emulation, in its own network namespace, reached over SSH — with the board facts a Pi 5
exposes (device-tree model and revision, cpuinfo, /boot/firmware/config.txt, an NVMe disk) so that
the appliance, its playbook and its tests meet something that behaves like the real board.
"""
