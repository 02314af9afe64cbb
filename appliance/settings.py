"""The appliance's configuration: one TOML file, validated once at start-up.

Unknown keys are errors, and every problem in a file is reported at once with its key
path, the offending value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .exitcodes import ConfigError
from .hardware import physical_core_count

DEFAULT_CONFIG_PATH = Path("/etc/pi-llm-appliance/appliance.toml")
CONFIG_ENV_VAR = "PI_APPLIANCE_CONFIG"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

DEFAULT_REQUEST_TOKENS = 256
Port = Annotated[int, Field(ge=1, le=65535)]
SHA256_DIGITS = frozenset("0123456789abcdef")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def credential_api_key() -> Path | None:
    """The key systemd passes as the unit's `api-key` credential (LoadCredential=), so that the
    configuration file needs no path, and the same file serves the service and its verifier."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    key = Path(directory) / "api-key" if directory else None
    return key if key is not None and key.is_file() else None


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    # Unset: the unit's api-key credential when there is one.
    api_key_file: Path | None = Field(default_factory=credential_api_key, validate_default=True)
    # Host-header allow-list against DNS rebinding. None: loopback names when bound to
    # loopback, the bind address otherwise; an empty list switches the check off.
    trusted_hosts: list[str] | None = None
    max_request_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    http_threads: int = Field(default=8, ge=2, le=64)

    @property
    def is_loopback(self) -> bool:
        return _is_loopback(self.host)

    @field_validator("api_key_file")
    @classmethod
    def _key_off_loopback(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        host = info.data.get("host", "127.0.0.1")
        if value is None and not _is_loopback(host):
            raise ValueError(
                f"required because server.host = {host!r} is not a loopback address: an LLM "
                "API open to the network without a key is how exposed servers get abused")
        return value

    @property
    def effective_trusted_hosts(self) -> list[str] | None:
        if self.trusted_hosts is not None:
            return self.trusted_hosts or None
        if self.is_loopback:
            return list(LOOPBACK_NAMES)
        if self.host in ("0.0.0.0", "::"):  # noqa: S104 - a comparison, not a bind
            return None  # every address of the machine: the API key is the guard
        return [self.host, *LOOPBACK_NAMES]


class ModelSettings(_Section):
    path: Path
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:/-]{1,128}$")
    sha256: str | None = None
    threads: int = Field(default_factory=physical_core_count, ge=1, le=256)
    context: int = Field(default=4096, ge=128, le=262_144)
    batch: int = Field(default=512, ge=16, le=8192)
    mlock: bool = False
    # "auto": a verification below target switches to a faster catalog variant that fits and is
    # installed (or installable from a pinned checksum), restarts and verifies again.
    policy: Literal["pinned", "auto"] = "pinned"
    fallback_attempts: int = Field(default=2, ge=1, le=10)

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digest = value.lower()
        if len(digest) != 64 or not SHA256_DIGITS.issuperset(digest):
            raise ValueError("must be 64 hexadecimal digits, as `sha256sum FILE` prints")
        return digest

    @property
    def model_id(self) -> str:
        return self.id or self.path.stem


class LimitsSettings(_Section):
    max_tokens: int = Field(default=1024, ge=1, le=32_768)
    # Unset: 256, or max_tokens when that is lower, so lowering the cap alone is enough.
    default_max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    queue_size: int = Field(default=4, ge=0, le=256)
    queue_timeout_seconds: float = Field(default=300.0, gt=0, le=3600)
    # A generation that makes no progress for this long is reported as hung.
    stall_seconds: float = Field(default=120.0, gt=0, le=3600)
    max_stop_sequences: int = Field(default=4, ge=0, le=16)

    @field_validator("default_max_tokens")
    @classmethod
    def _default_within_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = info.data.get("max_tokens")
        if value is not None and cap is not None and value > cap:
            raise ValueError(f"must not exceed limits.max_tokens ({cap})")
        return value

    @property
    def request_default_tokens(self) -> int:
        """max_tokens for a request that does not say."""
        return self.default_max_tokens or min(DEFAULT_REQUEST_TOKENS, self.max_tokens)


class PathSettings(_Section):
    state_dir: Path = Path("/var/lib/pi-llm-appliance")
    # The model store (`pi-appliance model`); model.path usually points at its `active` link.
    models_dir: Path = Path("/var/lib/pi-llm-appliance/models")
    # Where /sys and /proc are read from; tests point it at fixture trees.
    hardware_root: Path = Path("/")


class VerifySettings(_Section):
    """The speed check the verify unit runs after every start (`pi-appliance verify`)."""

    # false: /health is "ok" as soon as the model is loaded, without waiting for a verification.
    enabled: bool = True
    target_tps: float = Field(default=8.0, gt=0, le=10_000)
    # Pass at target * (1 - tolerance): run-to-run noise must not flip the verdict.
    tolerance: float = Field(default=0.05, ge=0, lt=1)
    # Tokens already in context when generation is timed: a realistic conversation.
    depth: int = Field(default=1024, ge=0, le=262_144)
    n_prompt: int = Field(default=64, ge=1, le=8192)
    n_gen: int = Field(default=64, ge=8, le=4096)
    repetitions: int = Field(default=3, ge=1, le=50)
    on_fail: Literal["degraded", "refuse"] = "degraded"
    # How long verification waits for the service to finish loading its model.
    wait_seconds: float = Field(default=900.0, gt=0, le=86_400)


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    model: ModelSettings
    limits: LimitsSettings = LimitsSettings()
    paths: PathSettings = PathSettings()
    verify: VerifySettings = VerifySettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _verification_fits_context(self) -> Settings:
        verify = self.verify
        room = self.model.context - verify.n_prompt - verify.n_gen
        if "depth" not in verify.model_fields_set and 0 <= room < verify.depth:
            # The default depth, in a smaller context: as deep as it fits.
            return self.model_copy(update={"verify": verify.model_copy(update={"depth": room})})
        needed = verify.depth + verify.n_prompt + verify.n_gen
        if verify.enabled and needed > self.model.context:
            raise ValueError(
                f"verify.depth + verify.n_prompt + verify.n_gen = {needed} tokens does not fit "
                f"in model.context = {self.model.context}: lower verify.depth or raise the context")
        return self

    @property
    def verify_state_file(self) -> Path:
        return self.paths.state_dir / "verify.json"

    @property
    def fallback_state_file(self) -> Path:
        """The steps `model.policy = "auto"` took after failed verifications."""
        return self.paths.state_dir / "fallback.json"


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: {error.error_count()} problem(s) in the configuration:"]
    for item in error.errors(include_url=False):
        path = ".".join(str(part) for part in item["loc"])
        if not path:  # a rule across sections: its message names the keys
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (value {item['input']!r}); check its spelling")
        elif item["type"] == "missing":
            lines.append(f"  {path}: required, but not given")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {path} = {item['input']!r}: {message}")
    return "\n".join(lines)


def config_path_from_env(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found") from exc
    except PermissionError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def merge_overrides(data: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Lay command-line values (section -> key -> value, None = not given) over the file's."""
    merged = {section: dict(values) if isinstance(values, dict) else values
              for section, values in data.items()}
    for section, values in overrides.items():
        given = {key: value for key, value in values.items() if value is not None}
        if given:
            target = merged.setdefault(section, {})
            if isinstance(target, dict):
                target.update(given)
    return merged


def validate(data: dict[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_settings(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None,
                  *, require_file: bool = True) -> Settings:
    """Read and validate the configuration; a missing default file is fine with overrides."""
    config_path = config_path_from_env(path)
    explicit = path is not None or bool(os.environ.get(CONFIG_ENV_VAR))
    if config_path.exists() or explicit or require_file:
        data, source = read_config_file(config_path), str(config_path)
    else:
        data, source = {}, "command line"
    return validate(merge_overrides(data, overrides or {}), source)
