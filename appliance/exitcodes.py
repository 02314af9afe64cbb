"""Process exit codes, distinct so that systemd (and people) can tell failures apart.

Values follow sysexits.h. The unit file lists the permanent ones in
`RestartPreventExitStatus=`: restarting cannot fix a bad config or a bad model file.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    NOT_OK = 1  # the answer is no: not healthy, below target, nothing to roll back to
    USAGE = 64  # EX_USAGE: the command line is wrong
    MODEL_INVALID = 65  # EX_DATAERR: not a GGUF, truncated, checksum mismatch
    MODEL_MISSING = 66  # EX_NOINPUT: the model file does not exist or cannot be read
    UNREACHABLE = 69  # EX_UNAVAILABLE: the service, or a program or library needed, is not there
    INTERNAL = 70  # EX_SOFTWARE: a bug; worth a restart and a report
    TRANSIENT = 75  # EX_TEMPFAIL: e.g. the port is taken; a restart may help
    CONFIG_INVALID = 78  # EX_CONFIG


# The failures that a restart cannot fix.
PERMANENT_FAILURES = (ExitCode.MODEL_INVALID, ExitCode.MODEL_MISSING, ExitCode.CONFIG_INVALID)


class ApplianceError(Exception):
    """An error with a message for the operator and the exit code it maps to."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, exit_code: ExitCode | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(ApplianceError):
    exit_code = ExitCode.CONFIG_INVALID


class ModelFileError(ApplianceError):
    exit_code = ExitCode.MODEL_INVALID
