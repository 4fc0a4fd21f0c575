"""The gate's configuration: frozen dataclasses, read from one TOML file, then overridden by CLI flags.

The TOML file has the shape of `GateConfig`: top-level keys, and one table per nested dataclass
(`[limits]`, `[proxy]`, `[forward]`, `[fetch]`, `[batch]`, `[timeouts]`, `[templates]`) or mapping
(`[thresholds]`, `[actions]`, `[moderation]`). Unknown keys are errors, so a typo never silently keeps a default.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib

from yarl import URL

from safeclip.runtime.cli_options import PRECISION_CHOICES, parse_backend
from safeclip.runtime.engine import DEFAULT_MAX_BATCH
from safeclip.runtime.preprocess import DEFAULT_MAX_PIXELS
from safeclip.runtime.server.batcher import DEFAULT_MAX_QUEUED
from safeclip.runtime.server.forwarding import AUTH_STYLES, PRESET_NAMES, Plan, resolve
from safeclip.runtime.server.moderation_taxonomy import DEFAULT_MODERATION_MAP, OPENAI_CATEGORIES
from safeclip.runtime.server.parts import SERVER_TOOLS, Policy

# What the gate does with a flagged request, strictest first (record.decide picks the strictest that applies).
ACTIONS = ("refuse", "inject", "monitor")
# Secrets: never read from the config file, never in the policy fingerprint. (key, flag, environment variable)
SECRETS = (
    ("api_key", "--api-key", "SAFECLIP_API_KEY"),
    ("upstream_api_key", "--upstream-api-key", "SAFECLIP_UPSTREAM_API_KEY"),
)
SECRET_KEYS = frozenset(key for key, _, _ in SECRETS)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The paper's dynamic correction: the model is told what the image was flagged as and how to respond.
DEFAULT_SAFETY_PROMPT = (
    "Safety notice from the content filter: an image in this conversation was classified as "
    "{category} content (probability {probability:.2f}). Do not describe, reproduce or encourage the "
    "harmful details of that image. If the request depends on them, decline briefly and say why; "
    "otherwise answer helpfully without them."
)
DEFAULT_REFUSAL = "I can't help with this request: an image in it was flagged by the content filter as {category}."
TEMPLATE_FIELDS = {"category": "gun", "categories": "gun, knife", "probability": 0.5}


def _int(minimum: int) -> Callable[[Any, str], int]:
    def parse(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{where}: must be >= {minimum}, got {value}")
        return value

    return parse


def _float(minimum: float, strict: bool = True) -> Callable[[Any, str], float]:
    def parse(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if value < minimum or (strict and value == minimum):
            raise ValueError(f"{where}: must be {'>' if strict else '>='} {minimum}, got {value}")
        return float(value)

    return parse


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _optional(parse: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda value, where: None if value is None else parse(value, where)


def _choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        if value not in choices:
            raise ValueError(f"{where}: {value!r} is not one of {list(choices)}")
        return value

    return parse


def _str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(_str(v, f"{where}[{i}]") for i, v in enumerate(value))


def _mapping(parse_value: Callable[[Any, str], Any]) -> Callable[[Any, str], dict[str, Any]]:
    def parse(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        return {str(k): parse_value(v, f"{where}.{k}") for k, v in value.items()}

    return parse


def _networks(value: Any, where: str) -> tuple[IPNetwork, ...]:
    out = []
    for i, text in enumerate(_str_tuple(value, where)):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError as e:
            raise ValueError(f"{where}[{i}]: {text!r} is not a CIDR ({e})") from e
    return tuple(out)


def _port(value: Any, where: str) -> int:
    port = _int(0)(value, where)
    if port > 65535:
        raise ValueError(f"{where}: a TCP port is at most 65535, got {port}")
    return port


def _upstream(value: Any, where: str) -> str:
    url = URL(_str(value, where))
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{where}: expected an http(s)://host:port URL, got {value!r}")
    if url.path.rstrip("/").endswith("/v1"):
        raise ValueError(f"{where}: give the server root without /v1 (requests keep their /v1/... path), got {value!r}")
    if url.query_string or url.fragment:
        raise ValueError(f"{where}: no query or fragment allowed, got {value!r}")
    return str(url).rstrip("/")


def _openai_categories(value: Any, where: str) -> tuple[str, ...]:
    names = _str_tuple(value, where)
    for name in names:
        if name not in OPENAI_CATEGORIES:
            raise ValueError(
                f"{where}: {name!r} is not an OpenAI moderation category; known: {list(OPENAI_CATEGORIES)}"
            )
    return names


def _template(value: Any, where: str) -> str:
    text = _str(value, where)
    try:
        text.format(**TEMPLATE_FIELDS)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{where}: bad template ({type(e).__name__}: {e}); fields: {sorted(TEMPLATE_FIELDS)}") from e
    return text


def _action(value: Any, where: str) -> str:
    return _choice(ACTIONS)(value, where)


def _backend(value: Any, where: str) -> str:
    try:
        return parse_backend(_str(value, where))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _threshold(value: Any, where: str) -> float:
    number = _float(0.0, strict=False)(value, where)
    if number > 1.0:
        raise ValueError(f"{where}: a threshold is in [0, 1], got {value}")
    return number


# How `build` reads each field. A field is either a value, checked and converted by its parser
# (`_parsed(parse, default)`), or a nested table that is a dataclass of its own (`_table(cls)`), built
# from the table by `build` with that dataclass's own field parsers.
PARSE, TABLE = "parse", "table"


def _parsed(parse: Callable[[Any, str], Any], default: Any = None, factory: Callable[[], Any] | None = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={PARSE: parse})
    return field(default=default, metadata={PARSE: parse})


def _table(cls: type) -> Any:
    return field(default_factory=cls, metadata={TABLE: cls})


@dataclass(frozen=True)
class Limits:
    # OpenAI takes 50 MB of images in a request, Anthropic 32 MB of request: a body either would take fits.
    max_body_bytes: int = _parsed(_int(1), 64 << 20)
    # As many as a hosted API takes (OpenAI 500, Anthropic 100; the upstream's own count is checked too,
    # see [forward]); max_request_pixels bounds what they may cost to decode.
    max_images: int = _parsed(_int(1), 500)
    max_image_bytes: int = _parsed(_int(1), 16 << 20)
    max_pixels: int = _parsed(_int(1), DEFAULT_MAX_PIXELS)
    # The pixels one request's images may declare together: decoding them is the costliest thing a client
    # can make the gate do. 400 MP is Anthropic's most (100 images of 2000 x 2000) and 33 photos of 12 MP
    # (the 50 MB OpenAI takes holds about 20); a JPEG past twice the forward size decodes reduced, at a
    # quarter of the cost or less.
    max_request_pixels: int = _parsed(_int(1), 400_000_000)
    # Server-side state ids (Responses response and item ids) remembered under inject and monitor, with
    # whether they hold a flagged image (memory.py); the least recently used are forgotten past this.
    max_state_ids: int = _parsed(_int(1), 100_000)


# Paths forwarded without a dialect: model lists and server facts. An entry is `[METHODS ]PATTERN`: a bare
# pattern forwards GET and HEAD without a body; `POST /api/show` (Ollama reads a JSON body there) names its
# methods. Add text routes you use (`POST /v1/completions`, `POST /v1/embeddings`) the same way; their
# bodies are still refused if anything in them decodes as an image.
DEFAULT_PROXY_ALLOW = ("/v1/models", "/v1/models/*", "/api/tags", "/api/version", "/api/ps", "POST /api/show")
READ_METHODS = frozenset({"GET", "HEAD"})  # what a bare pattern forwards: no body
PROXY_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})


def _path_patterns(value: Any, where: str) -> tuple[str, ...]:
    patterns = _str_tuple(value, where)
    for i, entry in enumerate(patterns):
        methods, pattern = _allow_entry(entry)
        if not pattern.startswith("/"):
            raise ValueError(
                f"{where}[{i}]: expected `[METHODS ]/path/pattern` (e.g. `POST /v1/completions`), got {entry!r}"
            )
        unknown = sorted(methods - PROXY_METHODS)
        if unknown:
            raise ValueError(
                f"{where}[{i}]: unknown HTTP method(s) {unknown} in {entry!r}; known: {sorted(PROXY_METHODS)}"
            )
    return patterns


def _allow_entry(entry: str) -> tuple[frozenset[str], str]:
    """(methods, pattern) of a `[proxy] allow` entry: `/p` is GET and HEAD; `POST /p`, `GET,POST /p` name theirs."""
    head, sep, pattern = entry.strip().partition(" ")
    if not sep:
        return READ_METHODS, head
    return frozenset(m.strip() for m in head.split(",") if m.strip()), pattern.strip()


@dataclass(frozen=True)
class ProxyConfig:
    """What is forwarded besides the screened routes, and in what form images are."""

    # `[METHODS ]PATTERN` entries (fnmatch glob, `*` spans `/` too) of the paths no dialect owns that may be
    # forwarded, matched against the canonical path (target.py) with the method.
    allow: tuple[str, ...] = _parsed(_path_patterns, DEFAULT_PROXY_ALLOW)
    # Forward images as the client sent them instead of as the screened pixels. Weaker: another decoder may
    # show the upstream another picture (an APNG's frames, pixels under transparency). Trusted clients only.
    forward_original: bool = _parsed(_bool, False)
    # Audio content parts (`input_audio`), forwarded only when they parse as their declared WAV or MP3: the
    # gate cannot screen audio, and llama.cpp decodes audio slots that are not audio as images.
    allow_audio: bool = _parsed(_bool, False)
    # Top-level request fields forwarded beyond each API's own (vLLM's top_k, repetition_penalty...); their
    # values must still be free of URLs and encoded data.
    extra_fields: tuple[str, ...] = _parsed(_str_tuple, ())

    def methods(self, path: str) -> frozenset[str]:
        """The methods `[proxy] allow` forwards for a canonical path (empty: not forwarded at all)."""
        out: frozenset[str] = frozenset()
        for entry in self.allow:
            methods, pattern = _allow_entry(entry)
            if fnmatch.fnmatchcase(path, pattern):
                out |= methods
        return out

    def allows(self, method: str, path: str) -> bool:
        return method in self.methods(path)


@dataclass(frozen=True)
class ForwardConfig:
    """At what size images go upstream, within which limits, and how the held key is sent
    (server/forwarding.py has the presets). Fields left unset take the preset's value."""

    # "auto": anthropic for api.anthropic.com, openai for api.openai.com, azure for *.openai.azure.com,
    # else local.
    preset: str = _parsed(_choice(PRESET_NAMES), "auto")
    # The forward budget: images are scaled down (never up) until each bound holds.
    long_edge: int | None = _parsed(_optional(_int(1)), None)
    short_edge: int | None = _parsed(_optional(_int(1)), None)
    max_pixels: int | None = _parsed(_optional(_int(1)), None)
    # The upstream's limits, checked before it is called (a 413 naming the image instead of its error).
    max_image_base64: int | None = _parsed(_optional(_int(1)), None)
    max_images_base64: int | None = _parsed(_optional(_int(1)), None)
    max_request_bytes: int | None = _parsed(_optional(_int(1)), None)
    max_images: int | None = _parsed(_optional(_int(1)), None)
    max_side: int | None = _parsed(_optional(_int(1)), None)
    # How the held key (SAFECLIP_UPSTREAM_API_KEY) is sent: "x-api-key" (Anthropic), "bearer" (OpenAI and
    # compatible servers), "api-key" (Azure OpenAI); "auto": the preset's, for local servers by the route
    # (X-Api-Key on /v1/messages, Bearer elsewhere).
    auth: str = _parsed(_choice(AUTH_STYLES), "auto")

    def plan(self, upstream: str) -> Plan:
        budget = {"long_edge": self.long_edge, "short_edge": self.short_edge, "max_pixels": self.max_pixels}
        limits = {
            name: getattr(self, name)
            for name in ("max_image_base64", "max_images_base64", "max_request_bytes", "max_images", "max_side")
        }
        return resolve(upstream, self.preset, self.auth, budget, limits)


def _server_tools(value: Any, where: str) -> tuple[str, ...]:
    names = _str_tuple(value, where)
    for name in names:
        if name not in SERVER_TOOLS:
            raise ValueError(
                f"{where}: {name!r} is not a server-side tool the gate knows; known: {sorted(SERVER_TOOLS)}"
            )
    return names


@dataclass(frozen=True)
class ToolsConfig:
    """Server-side tools (the provider fetches or makes content the gate never sees): refused unless listed."""

    allow: tuple[str, ...] = _parsed(_server_tools, ())


@dataclass(frozen=True)
class FetchConfig:
    """How image URLs are fetched; addresses in `allow` are reachable even when private or loopback."""

    allow: tuple[IPNetwork, ...] = _parsed(_networks, ())
    connect_timeout: float = _parsed(_float(0.0), 3.0)
    timeout: float = _parsed(_float(0.0), 10.0)
    max_redirects: int = _parsed(_int(0), 5)


@dataclass(frozen=True)
class BatchConfig:
    # A few ms of waiting lets concurrent requests share one engine call; the first request pays it.
    delay_ms: float = _parsed(_float(0.0, strict=False), 2.0)
    size: int = _parsed(_int(1), DEFAULT_MAX_BATCH)
    # Images waiting for an engine call; a request that would queue more is answered 503 with a Retry-After.
    max_queued: int = _parsed(_int(1), DEFAULT_MAX_QUEUED)
    # Threads that decode and resize images, apart from the engine's (Pillow releases the GIL there).
    decode_workers: int = _parsed(_int(1), max(2, min(8, os.cpu_count() or 2)))


@dataclass(frozen=True)
class Timeouts:
    upstream_connect: float = _parsed(_float(0.0), 5.0)
    # Time allowed between two reads from the upstream: a long generation keeps streaming, a hung one ends.
    upstream_read: float = _parsed(_float(0.0), 600.0)


@dataclass(frozen=True)
class Templates:
    """str.format templates with {category} (the deciding one), {categories} and {probability}."""

    refusal: str = _parsed(_template, DEFAULT_REFUSAL)
    safety_prompt: str = _parsed(_template, DEFAULT_SAFETY_PROMPT)


@dataclass(frozen=True)
class GateConfig:
    engine: str = _parsed(_str, "")
    # Empty: guardrail-only, the gate screens (/v1/moderations, the LiteLLM guardrail) and forwards nothing.
    upstream: str = _parsed(_upstream, "")
    host: str = _parsed(_str, "127.0.0.1")
    port: int = _parsed(_port, 8080)
    action: str = _parsed(_action, "refuse")
    actions: dict[str, str] = _parsed(_mapping(_action), factory=dict)
    threshold: float | None = _parsed(_optional(_threshold), None)
    thresholds: dict[str, float] = _parsed(_mapping(_threshold), factory=dict)
    disabled: tuple[str, ...] = _parsed(_str_tuple, ())
    backend: str = _parsed(_backend, "auto")
    precision: str | None = _parsed(_optional(_choice(PRECISION_CHOICES)), None)
    fail_open: bool = _parsed(_bool, False)
    # Never read from the TOML file (see load_config): secrets come from the flag or SAFECLIP_API_KEY.
    api_key: str | None = field(default=None, repr=False, metadata={PARSE: _optional(_str)})
    # Sent upstream the way the provider takes it (`[forward] auth`) instead of any key the client sent;
    # never read from the file either (the flag or SAFECLIP_UPSTREAM_API_KEY).
    upstream_api_key: str | None = field(default=None, repr=False, metadata={PARSE: _optional(_str)})
    audit_log: str | None = _parsed(_optional(_str), None)
    verdict_field: bool = _parsed(_bool, False)
    cache_size: int = _parsed(_int(0), 4096)
    # The cache also keeps each image's screened PNG, so a resent image costs no decode: bounded here.
    cache_bytes: int = _parsed(_int(0), 256 << 20)
    # Entries added to (or replacing) DEFAULT_MODERATION_MAP: our category -> OpenAI categories ([] for none).
    moderation: dict[str, tuple[str, ...]] = _parsed(_mapping(_openai_categories), factory=dict)
    limits: Limits = _table(Limits)
    proxy: ProxyConfig = _table(ProxyConfig)
    forward: ForwardConfig = _table(ForwardConfig)
    fetch: FetchConfig = _table(FetchConfig)
    batch: BatchConfig = _table(BatchConfig)
    timeouts: Timeouts = _table(Timeouts)
    templates: Templates = _table(Templates)
    tools: ToolsConfig = _table(ToolsConfig)

    @functools.cached_property  # read on every request; the config never changes
    def policy(self) -> Policy:
        """What the dialects let through beyond their own allow-lists."""
        return Policy(
            allow_audio=self.proxy.allow_audio,
            extra_fields=frozenset(self.proxy.extra_fields),
            tools=frozenset(self.tools.allow),
            max_audio_bytes=self.limits.max_image_bytes,
        )

    def action_for(self, category: str) -> str:
        return self.actions.get(category, self.action)

    @property
    def actions_in_use(self) -> frozenset[str]:
        """Every action some category can get."""
        return frozenset({self.action, *self.actions.values()})

    def check_categories(self, names: tuple[str, ...], neutral: str) -> None:
        """Fail on a category the engine does not have (called once the engine's manifest is known)."""
        flaggable = [n for n in names if n != neutral]
        for table, keys in (("actions", self.actions), ("moderation", self.moderation)):
            for name in keys:
                if name not in flaggable:
                    raise ValueError(f"[{table}]: unknown category {name!r}; the engine has {flaggable}")

    def moderation_map(self, names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        """Each of the engine's categories -> the OpenAI categories it feeds (maybe none)."""
        out = {}
        for name in names:
            default = (name,) if name in OPENAI_CATEGORIES else DEFAULT_MODERATION_MAP.get(name, ())
            out[name] = self.moderation.get(name, default)
        return out


def build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """A dataclass from a mapping: every key known, every value parsed by its field's parser."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        label = f"{where}.{name}" if where else name
        if TABLE in f.metadata:
            if not isinstance(value, Mapping):
                raise ValueError(f"{label}: expected a table, got {value!r}")
            kwargs[name] = build(f.metadata[TABLE], value, label)
        else:
            kwargs[name] = f.metadata[PARSE](value, label)
    return cls(**kwargs)


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides win key by key; nested tables merge instead of replacing each other."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from e
    for key, flag, env in SECRETS:
        if key in data:
            raise ValueError(f"{path}: {key} is not read from files; use {flag} or {env}")
    return data


def load_config(path: str | Path | None, overrides: Mapping[str, Any]) -> GateConfig:
    """The config file (if any), then `overrides` (CLI flags, shaped like the file), validated."""
    data = merge(read_toml(path) if path else {}, overrides)
    config = build(GateConfig, data, str(path) if path else "")
    if not config.engine:
        raise ValueError("engine is required (--engine or `engine = ...` in the config file)")
    if config.upstream_api_key and not config.upstream:
        raise ValueError("an upstream API key was given but no upstream (--upstream or `upstream = ...`)")
    return config


def check_paths(config: GateConfig) -> None:
    """ValueError naming the key when a path the gate will open cannot be used: checked when `serve` loads
    its configuration, so a typo is one line and exit 2 before the server starts, not a traceback later.

    `load_config` itself only parses (and is used so by tests and tools without these files)."""
    from safeclip.runtime.backends.triton import is_triton_url
    from safeclip.runtime.contract import MANIFEST_FILE

    engine = Path(config.engine)
    if not engine.is_dir():
        raise ValueError(f"engine: {engine}: no such folder (build one with `make engine NAME=...`)")
    if not (engine / MANIFEST_FILE).is_file() and not is_triton_url(config.backend):
        raise ValueError(f"engine: {engine}: no {MANIFEST_FILE} (is it an engine folder made by `safeclip export`?)")
    if config.audit_log and config.audit_log != "-":
        check_writable(Path(config.audit_log), "audit_log")


def check_writable(path: Path, key: str) -> None:
    """ValueError unless `path` can be opened for appending (created if missing, its folder must exist)."""
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{key}: {path} is a folder; give a file path")
    if not folder.is_dir():
        raise ValueError(f"{key}: cannot write {path}: the folder {folder} does not exist (create it first)")
    target = path if path.exists() else folder
    if not os.access(target, os.W_OK):
        raise ValueError(f"{key}: cannot write {path}: {target} is not writable by this user")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly view (networks as strings), used to fingerprint the policy; the API key is left out."""
    out = {}
    for f in fields(config):
        if f.name in SECRET_KEYS:
            continue
        value = getattr(config, f.name)
        if is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = [str(v) for v in value]
        out[f.name] = value
    return out
