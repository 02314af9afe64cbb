"""The appliance's configuration: one TOML file, validated once at start-up.

Unknown keys are errors, and every problem in a file is reported at once with its key
path, the offending value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import stat
import struct
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from appliance import layout
from appliance.exitcodes import ConfigError
from appliance.util import LOOPBACK_HOSTS, sha256_digest

DEFAULT_CONFIG_PATH = layout.CONFIG_FILE
CONFIG_ENV_VAR = "PI_APPLIANCE_CONFIG"
# The verifier marks its requests with it and the service's token
# (`Settings.verification_token_file`), so that they stay out of the users' metrics.
VERIFICATION_HEADER = "X-Appliance-Verification"
MIN_KEY_LENGTH = 16

DEFAULT_REQUEST_TOKENS = 256
Port = Annotated[int, Field(ge=1, le=65535)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _absolute_path(path: Path) -> Path:
    # A relative path means another file for each directory a process starts in (under systemd
    # that is /), and `..` can lead out of the directory a path seems to name.
    if not path.is_absolute():
        raise ValueError("must be an absolute path (starting with /); write it in full, as "
                         "`realpath -s PATH` prints it")
    if ".." in path.parts:
        raise ValueError(f"must not contain '..'; write the path it leads to, e.g. "
                         f"{os.path.normpath(path)!r}")
    return path


AbsolutePath = Annotated[Path, AfterValidator(_absolute_path)]

# A POSIX ACL as Linux stores it in an extended attribute: a 4-byte version, then entries of
# (tag, permissions, id). Its mask takes the place of the group bits in the file's mode.
_ACL_XATTR = "system.posix_acl_access"
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x02, 0x04, 0x08, 0x10, 0x20


def _shared(path: Path, mode: int) -> str | None:
    """Why users other than the file's owner and this process's user may read or write the
    file, and how to stop it; None if they may not.

    Without an ACL that is the mode's group and other bits. With one, those group bits are the
    ACL's mask, so its entries decide: systemd hands a service its credential on a file system
    with ACLs (tmpfs) as root's, mode 0400, with read access for the service's user — `stat`
    shows 0440 — and that must pass."""
    try:
        acl = os.getxattr(path, _ACL_XATTR)
    except OSError:  # no ACL, or a file system without them
        acl = b""
    if not acl:
        if not mode & 0o077:
            return None
        return f"group or others may use it (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
    entries = [_ACL_ENTRY.unpack_from(acl, offset)
               for offset in range(4, len(acl) - _ACL_ENTRY.size + 1, _ACL_ENTRY.size)]
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 0o7)
    if any((tag == _ACL_OTHER and perm)
           or (tag in (_ACL_GROUP_OBJ, _ACL_GROUP) and perm & mask)
           or (tag == _ACL_USER and who != os.geteuid() and perm & mask)
           for tag, perm, who in entries):
        return (f"its ACL lets other users or groups use it (getfacl {path}); run: "
                f"setfacl -b {path}; chmod 600 {path}")
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a user without an entry (a container, a user namespace)
        return str(uid)


def read_api_key(path: Path) -> bytes:
    """The key in `path`: a regular file owned by this process's user or root, which nobody
    else may read or write (a systemd credential passes: the service's own, or root's with an
    ACL for the service), and a key long enough to be secret."""
    setting = f"server.api_key_file = '{path}'"
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read it: {exc.strerror}; "
                          "create it with: umask 077; openssl rand -hex 32 > "
                          f"{path}") from None
    # Checked before reading: opening a FIFO would block for ever.
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{setting}: not a regular file (a directory, pipe or device); "
                          "point server.api_key_file at the file that holds the key")
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        # Its owner could change the key, or grant it to anyone, at any time.
        raise ConfigError(f"{setting}: owned by {_user_name(info.st_uid)}, not by "
                          f"{_user_name(me)} (who runs this) or root; as root, run: chown "
                          f"{_user_name(me)} {path}")
    shared = _shared(path, info.st_mode)
    if shared:
        raise ConfigError(f"{setting}: the key must be its owner's alone, but {shared}")
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read it: {exc.strerror}; run this as its owner "
                          f"({_user_name(info.st_uid)}), who must be able to read it: "
                          f"chmod 600 {path}") from None
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"{setting}: the key is {len(key)} characters; "
                          f"use at least {MIN_KEY_LENGTH} (e.g. openssl rand -hex 32)")
    return key



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def credential_api_key() -> Path | None:
    """The key systemd passes as the unit's `api-key` credential (LoadCredential=), so that the
    configuration file needs no path, and the same file serves the service and its verifier.
    Outside the units (root running `pi-appliance plan` on the device), the file at rest."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    for key in ([Path(directory) / "api-key"] if directory else []) + [layout.API_KEY_FILE]:
        if key.is_file():
            return key
    return None


class ServerSettings(_Section):
    host: str = Field(default="127.0.0.1", description=(
        "address to bind; anything but loopback **requires** `api_key_file`"))
    port: Port = Field(default=8080, description="TCP port of the API")
    api_key_file: Path | None = Field(
        default_factory=credential_api_key, validate_default=True, description=(
            "file with the bearer key (≥ 16 characters, not world-readable); unset: the units' "
            "`api-key` credential, else `/etc/pi-llm-appliance/api-key` when it exists"))
    trusted_hosts: list[str] | None = Field(default=None, description=(
        "Host-header allow-list against DNS rebinding; unset: loopback names when bound to "
        "loopback, the bind address otherwise, off for `0.0.0.0`; `[]` turns it off"))
    max_request_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576,
                                   description="larger request bodies get 413")
    http_threads: int = Field(default=8, ge=2, le=64, description=(
        "HTTP worker threads (one generation runs at a time regardless)"))
    connection_limit: int = Field(default=100, ge=4, le=1000, description=(
        "open connections at most; beyond, new ones wait in the kernel's queue"))
    connections_per_client: int = Field(default=16, ge=1, le=1000, description=(
        "open connections one address may hold; beyond, 429 and closed, so that one host "
        "cannot take them all and lock out `/health` and monitoring"))
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300, description=(
        "a request's line and headers must arrive within it (from connecting, or from the "
        "next request's first byte); slower clients are disconnected"))
    idle_timeout_seconds: float = Field(default=30.0, gt=0, le=3600, description=(
        "a kept-alive connection idle that long, or a body that stops arriving for that long, "
        "is closed"))

    @property
    def is_loopback(self) -> bool:
        return _is_loopback(self.host)

    @property
    def local_url(self) -> str:
        """Where a program on the device itself reaches the service (the verifier, `health`)."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - listening everywhere; ask loopback
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

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
            return list(LOOPBACK_HOSTS)
        if self.host in ("0.0.0.0", "::"):  # noqa: S104 - a comparison, not a bind
            return None  # every address of the machine: the API key is the guard
        return [self.host, *LOOPBACK_HOSTS]


class ModelSettings(_Section):
    path: AbsolutePath = Field(description=(
        "the GGUF model file; on an appliance the store's `active` link (required)"))
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:/-]{1,128}$", description=(
        "the name `/v1/models` reports; unset: the catalog id the store recorded, else the "
        "file's stem"))
    sha256: str | None = Field(default=None, description=(
        "pinned checksum; a mismatch refuses to load (exit 65)"))
    threads: int | None = Field(default=None, ge=1, le=256, description=(
        "inference threads; unset: measured, the fastest decode of 1…physical cores on the "
        "loaded model, timed at its first start and stored per model in "
        "`<state_dir>/threads.json`"))
    context: int = Field(default=4096, ge=128, le=262_144, description="context size in tokens")
    flash_attention: bool = Field(default=True, description=(
        "llama.cpp's flash attention (decode at depth, docs/benchmarks.md); `false`: plain"))
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = Field(default="f16", description=(
        "KV cache element type; `q8_0` halves its memory, `q4_0` quarters it (both need "
        "`flash_attention`); the planner budgets for it"))
    batch: int = Field(default=512, ge=16, le=8192, description="prompt-processing batch")
    special_tokens_in_chat: bool = Field(default=False, description=(
        "`true`: chat messages may write the model's control tokens (`<|im_start|>system`, "
        "...) and so open turns of their own; `false`: their text is taken as plain text"))
    embedding_pooling: Literal["mean", "cls", "last"] | None = Field(default=None, description=(
        "how `/v1/embeddings` pools the model's hidden states into one vector a text; unset: "
        "the pooling an embedding model's GGUF declares, and none for a generative model "
        "(the endpoint then answers 400)"))
    chat_template_file: Path | None = Field(default=None, description=(
        "a Jinja chat template to use instead of the one in the GGUF file (as llama-server's "
        "`--chat-template-file`), for a model whose own is missing or wrong"))
    mlock: bool = Field(default=False, description=(
        "lock the model in RAM (the unit then needs `LimitMEMLOCK=infinity`)"))
    policy: Literal["pinned", "auto"] = Field(default="pinned", description=(
        "`auto`: a verification below target switches to a faster catalog variant that fits "
        "and is installed or installable with a pinned checksum, restarts and verifies again "
        "(docs/planner.md)"))
    fallback_attempts: int = Field(default=2, ge=1, le=10, description=(
        "at most this many automatic switches until a person chooses a model"))

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str | None) -> str | None:
        return None if value is None else sha256_digest(value)

    @model_validator(mode="after")
    def _quantized_cache_needs_flash_attention(self) -> ModelSettings:
        if self.kv_cache_type != "f16" and not self.flash_attention:
            raise ValueError(f"model.kv_cache_type = {self.kv_cache_type!r} needs "
                             "model.flash_attention = true: llama.cpp quantizes the V cache "
                             "only with flash attention")
        return self

    @property
    def model_id(self) -> str:
        return self.id or self.path.stem


class LimitsSettings(_Section):
    max_tokens: int = Field(default=1024, ge=1, le=32_768, description=(
        "cap on the `max_tokens` a request may ask for"))
    default_max_tokens: int | None = Field(default=None, ge=1, le=32_768, description=(
        "when a request does not say; unset: 256, or `max_tokens` if lower, so lowering the "
        "cap alone is enough; must not exceed `max_tokens`"))
    queue_size: int = Field(default=4, ge=0, le=256, description=(
        "requests that may wait while one generates; beyond: 429; at most "
        "`server.http_threads` − 2"))
    queue_timeout_seconds: float = Field(default=300.0, gt=0, le=3600, description=(
        "a queued request waiting longer gets 503"))
    stall_seconds: float | None = Field(default=None, gt=0, le=3600, description=(
        "a request with no progress (no prompt chunk evaluated, no token) for this long makes "
        "health `stalled` and stops watchdog pings; unset: ten times the longest step the "
        "measured prompt and decode speeds predict, at least 60 s (120 s until measured)"))
    max_stop_sequences: int = Field(default=4, ge=0, le=16, description=(
        "`stop` strings a request may give"))

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
    state_dir: AbsolutePath = Field(default=layout.STATE_DIR, description=(
        "verification result (`verify.json`), fallback history, measured bandwidth, checksum "
        "cache fallback"))
    models_dir: AbsolutePath = Field(default=layout.MODELS_DIR, description=(
        "the model store (`pi-appliance model`); `model.path` usually points at its `active` "
        "link"))
    hardware_root: AbsolutePath = Field(default=Path("/"), description=(
        "where `/sys` and `/proc` are read from (tests point it at fixtures)"))


class VerifySettings(_Section):
    """The speed check the verify unit runs after every start (`pi-appliance verify`)."""

    enabled: bool = Field(default=True, description=(
        "`/health` waits for a speed verification of each start; `false`: `ok` once loaded"))
    target_tps: float = Field(default=8.0, gt=0, le=10_000, description=(
        "decode tokens/s the service must reach at `verify.depth`"))
    tolerance: float = Field(default=0.05, ge=0, lt=1, description=(
        "pass at `target_tps × (1 − tolerance)`: run-to-run noise must not flip the verdict"))
    depth: int = Field(default=0, ge=0, le=262_144, description=(
        "context tokens before the timed generation that is gated: 0 is how the published Pi 5 "
        "figures are measured (llama-bench `tg128`); set it to gate at depth"))
    conversation_depth: int = Field(default=1024, ge=0, le=262_144, description=(
        "a second decode figure, at this depth (a conversation under way), measured and "
        "reported beside the gated one, not gated; 0: none; left unset in a smaller "
        "`model.context`, as deep as fits"))
    n_prompt: int = Field(default=64, ge=1, le=8192, description="the verification's prompt tokens")
    n_gen: int = Field(default=64, ge=8, le=4096, description="tokens generated per timed pass")
    repetitions: int = Field(default=3, ge=1, le=50, description="timed passes (the median counts)")
    on_fail: Literal["degraded", "refuse"] = Field(default="degraded", description=(
        "below target: `degraded` (serve; `/health` 200 `degraded`) or `refuse` (503 `refused`)"))
    wait_seconds: float = Field(default=900.0, gt=0, le=86_400, description=(
        "how long the verifier waits for the model to load"))
    by: Literal["service", "unit"] = Field(default="service", description=(
        "who verifies each start: `service`, `serve` itself once its model is loaded (a plain "
        "`pi-appliance serve` reaches `ok`), or `unit`, pi-llm-appliance-verify.service (what "
        "provisioning installs; `model.policy = \"auto\"` needs it, to restart after a "
        "fallback)"))

    @property
    def depths(self) -> list[int]:
        """The depths a verification measures: the gated one first."""
        extra = self.conversation_depth not in (0, self.depth)
        return [self.depth, self.conversation_depth] if extra else [self.depth]


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    model: ModelSettings
    limits: LimitsSettings = LimitsSettings()
    paths: PathSettings = PathSettings()
    verify: VerifySettings = VerifySettings()
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="`debug`, `info`, `warning` or `error`")

    @model_validator(mode="after")
    def _auto_policy_has_the_verify_unit(self) -> Settings:
        if self.model.policy == "auto" and self.verify.enabled and self.verify.by != "unit":
            raise ValueError(
                'model.policy = "auto" needs verify.by = "unit": after a fallback to another '
                "model, pi-llm-appliance-verify.service restarts the service")
        return self

    @model_validator(mode="after")
    def _queue_leaves_an_http_thread_free(self) -> Settings:
        # A queued request waits for the model on its HTTP thread (engine.acquire) and the one
        # generating holds another; one more must stay free, or the next request could not even
        # be told 429 and /health would not answer until a generation ended.
        queue, threads = self.limits.queue_size, self.server.http_threads
        if queue > threads - 2:
            raise ValueError(
                f"limits.queue_size = {queue} needs server.http_threads of at least {queue + 2} "
                f"(it is {threads}): each queued request holds an HTTP thread while it waits, "
                "the running one holds another, and one must stay free for /health and for "
                f"refusing the next with 429; lower limits.queue_size to {threads - 2} or raise "
                f"server.http_threads to {queue + 2}")
        return self

    @model_validator(mode="after")
    def _verification_fits_context(self) -> Settings:
        verify = self.verify
        room = self.model.context - verify.n_prompt - verify.n_gen
        if ("conversation_depth" not in verify.model_fields_set
                and 0 <= room < verify.conversation_depth):
            # The default depth, in a smaller context: as deep as it fits.
            verify = verify.model_copy(update={"conversation_depth": room})
        deepest = max(verify.depth, verify.conversation_depth)
        if verify.enabled and deepest > room:
            raise ValueError(
                f"a verification at depth {deepest} needs "
                f"{deepest + verify.n_prompt + verify.n_gen} tokens (with verify.n_prompt and "
                f"verify.n_gen), more than model.context = "
                f"{self.model.context}: lower verify.depth or verify.conversation_depth, or raise "
                "the context")
        return self if verify is self.verify else self.model_copy(update={"verify": verify})

    @property
    def verify_state_file(self) -> Path:
        return self.paths.state_dir / "verify.json"

    @property
    def verification_token_file(self) -> Path:
        """The running service's secret that marks the verifier's requests (mode 0600)."""
        return self.paths.state_dir / "verification-token"

    @property
    def first_boot_state_file(self) -> Path:
        """A flashed image's first boot: the step it is at, and whether it is done."""
        return self.paths.state_dir / "first-boot.json"

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
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}: a directory, not a configuration file; name the TOML file "
                          f"(e.g. {path / DEFAULT_CONFIG_PATH.name})") from exc
    except OSError as exc:  # permissions, a symlink loop, an I/O error of the drive
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition; tomllib decodes it so
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 text (byte "
                          f"0x{exc.object[exc.start]:02x}); TOML files are UTF-8: save it as "
                          "UTF-8") from exc
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


def read_settings(path: Path) -> Settings:
    """The file at `path`, read and validated."""
    return validate(read_config_file(path), str(path))


def configured_settings(explicit: Path | None) -> Settings | None:
    """The appliance's configuration, for a command that can do without one: the file named
    (--config or $PI_APPLIANCE_CONFIG, which must then exist), else the default file when it
    exists, else None."""
    path = config_path_from_env(explicit)
    if explicit is None and not os.environ.get(CONFIG_ENV_VAR) and not path.exists():
        return None
    return read_settings(path)


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
