"""The gate's configuration: frozen dataclasses, read from one TOML file, then overridden by CLI flags.

The TOML file has the shape of `GateConfig`: top-level keys, and one table per nested dataclass
(`[limits]`, `[proxy]`, `[forward]`, `[fetch]`, `[batch]`, `[timeouts]`, `[templates]`, `[tools]`) or mapping
(`[thresholds]`, `[actions]`, `[moderation]`). Unknown keys are errors, so a typo never silently keeps a default.

Each key is declared once, as a field whose `Option` (options.py) holds its check, default, help and flag:
`build` reads the file with it, `serve`'s flags are generated from it (server/cli.py), and so is the README's
configuration reference (`python -m safeclip.runtime.server.config` prints it; a test keeps the README equal).
A key is added as one field of its table's dataclass, e.g.
`max_json_values: int = field_of(Option(integer(1), DEFAULT_MAX_VALUES, "JSON values one body may hold"))`
(with `flag="--max-json-values"` if it should have one), then the README's block is regenerated.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import ipaddress
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib

from yarl import URL

from safeclip.runtime.cli_options import (
    BACKEND,
    BATCH_SIZE,
    DISABLED,
    ENGINE,
    MAX_PIXELS,
    PRECISION,
    THRESHOLD,
    THRESHOLDS,
)
from safeclip.runtime.image_formats import MAX_JPEG_SCANS
from safeclip.runtime.options import (
    BOOLEAN,
    OPTION,
    TEXT,
    TEXTS,
    Option,
    Value,
    choice,
    field_of,
    integer,
    mapping,
    number,
    optional,
    text,
    texts,
)
from safeclip.runtime.server.batcher import DEFAULT_MAX_QUEUED
from safeclip.runtime.server.dialects import ROUTES
from safeclip.runtime.server.dialects.litellm import GUARDRAIL_PATH
from safeclip.runtime.server.forwarding import AUTH_STYLES, PRESET_NAMES, Plan, resolve
from safeclip.runtime.server.jsonbody import DEFAULT_MAX_VALUES
from safeclip.runtime.server.moderation_taxonomy import DEFAULT_MODERATION_MAP, OPENAI_CATEGORIES
from safeclip.runtime.server.parts import SERVER_TOOLS, Policy

# What the gate does with a flagged request, strictest first (record.decide picks the strictest that applies).
ACTIONS = ("refuse", "inject", "monitor")
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


def parse_actions(text: str) -> dict[str, str]:
    """'alcohol=monitor,gun=inject' -> {'alcohol': 'monitor', 'gun': 'inject'}"""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, action = item.rpartition("=")
        if not sep or not name.strip() or action.strip() not in ACTIONS:
            raise argparse.ArgumentTypeError(f"expected CATEGORY=ACTION with ACTION in {ACTIONS}, got {item!r}")
        out[name.strip()] = action.strip()
    return out


def _network(text: str, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise ValueError(f"{where}: {text!r} is not a CIDR ({e})") from e


def _port(value: Any, where: str) -> int:
    port = integer(0)(value, where)
    if port > 65535:
        raise ValueError(f"{where}: a TCP port is at most 65535, got {port}")
    return port


def _upstream(text: str, where: str) -> str:
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{where}: expected an http(s)://host:port URL, got {text!r}")
    if url.path.rstrip("/").endswith("/v1"):
        raise ValueError(f"{where}: give the server root without /v1 (requests keep their /v1/... path), got {text!r}")
    if url.query_string or url.fragment:
        raise ValueError(f"{where}: no query or fragment allowed, got {text!r}")
    return str(url).rstrip("/")


def _openai_category(name: str, where: str) -> str:
    if name not in OPENAI_CATEGORIES:
        raise ValueError(f"{where}: {name!r} is not an OpenAI moderation category; known: {list(OPENAI_CATEGORIES)}")
    return name


def _template(text: str, where: str) -> str:
    try:
        text.format(**TEMPLATE_FIELDS)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{where}: bad template ({type(e).__name__}: {e}); fields: {sorted(TEMPLATE_FIELDS)}") from e
    return text


def _path_pattern(entry: str, where: str) -> str:
    methods, pattern = _allow_entry(entry)
    if not pattern.startswith("/"):
        raise ValueError(f"{where}: expected `[METHODS ]/path/pattern` (e.g. `POST /v1/completions`), got {entry!r}")
    unknown = sorted(methods - PROXY_METHODS)
    if unknown:
        raise ValueError(f"{where}: unknown HTTP method(s) {unknown} in {entry!r}; known: {sorted(PROXY_METHODS)}")
    return entry


def _server_tool(name: str, where: str) -> str:
    if name not in SERVER_TOOLS:
        raise ValueError(f"{where}: {name!r} is not a server-side tool the gate knows; known: {sorted(SERVER_TOOLS)}")
    return name


ACTION = choice(ACTIONS)
SECONDS = number(0.0)
TEMPLATE = text("string.format template", _template)
OPTIONAL_COUNT = optional(integer(1))
PRESET_DEFAULT = "the preset's"  # a [forward] key left unset


def _table(cls: type) -> Any:
    """A nested table of the file (`[limits]`...): a dataclass of its own, read by `build` with its options."""
    return field(default_factory=cls, metadata={TABLE: cls})


TABLE = "table"


@dataclass(frozen=True)
class Limits:
    """What one request may hold; past a limit it is a 4xx in the route's error format."""

    # OpenAI takes 50 MB of images in a request, Anthropic 32 MB of request: a body either would take fits.
    max_body_bytes: int = field_of(Option(integer(1), 64 << 20, "bytes of a request body", flag="--max-body-bytes"))
    # As many as a hosted API takes (OpenAI 500, Anthropic 100; the upstream's own count is checked too,
    # see [forward]); max_request_pixels bounds what they may cost to decode.
    max_images: int = field_of(Option(integer(1), 500, "images per request", flag="--max-images"))
    max_image_bytes: int = field_of(
        Option(integer(1), 16 << 20, "bytes of one image (or audio part), encoded", flag="--max-image-bytes")
    )
    max_pixels: int = field_of(MAX_PIXELS)
    # Decoding them is the costliest thing a client can make the gate do. 400 MP is Anthropic's most (100
    # images of 2000 x 2000) and 33 photos of 12 MP (the 50 MB OpenAI takes holds about 20); a JPEG past
    # twice the forward size decodes reduced, at a quarter of the cost or less.
    max_request_pixels: int = field_of(
        Option(
            integer(1),
            400_000_000,
            "pixels one request's images may declare together",
            flag="--max-request-pixels",
        )
    )
    max_state_ids: int = field_of(
        Option(
            integer(1),
            100_000,
            "Responses response and item ids remembered under inject and monitor, with whether they hold a "
            "flagged image; the least recently used are forgotten past this",
        )
    )
    # Bounds the CPU a body costs to parse and walk (jsonbody.py, bodies.py).
    max_json_values: int = field_of(
        Option(integer(1), DEFAULT_MAX_VALUES, "JSON values one request body may hold; past it, a 400")
    )
    # Each scan is one more decoding pass over the picture, so a small file of thousands decodes for
    # minutes; an ordinary progressive JPEG has about 10 (image_formats.py).
    max_jpeg_scans: int = field_of(
        Option(integer(1), MAX_JPEG_SCANS, "scans one JPEG may have; past it, a 413 naming the image")
    )
    # Decodes run in worker processes that are ended past it (decoding.py, workers.py). The largest image the
    # defaults allow (64 MP) decodes in a few seconds on one slow core.
    decode_timeout: float = field_of(
        Option(number(0.0), 30.0, "seconds one image may take to decode; past it, a 413 naming the image")
    )


# Paths forwarded without a dialect: model lists and server facts. An entry is `[METHODS ]PATTERN`: a bare
# pattern forwards GET and HEAD without a body; `POST /api/show` (Ollama reads a JSON body there) names its
# methods. Add text routes you use (`POST /v1/completions`, `POST /v1/embeddings`) the same way; their
# bodies are still refused if anything in them decodes as an image.
DEFAULT_PROXY_ALLOW = ("/v1/models", "/v1/models/*", "/api/tags", "/api/version", "/api/ps", "POST /api/show")
READ_METHODS = frozenset({"GET", "HEAD"})  # what a bare pattern forwards: no body
PROXY_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})


_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.1 field-name


def _header_name(name: str, where: str) -> str:
    if not _HEADER_TOKEN.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not an HTTP header name")
    return name.lower()


def _allow_entry(entry: str) -> tuple[frozenset[str], str]:
    """(methods, pattern) of a `[proxy] allow` entry: `/p` is GET and HEAD; `POST /p`, `GET,POST /p` name theirs."""
    head, sep, pattern = entry.strip().partition(" ")
    if not sep:
        return READ_METHODS, head
    return frozenset(m.strip() for m in head.split(",") if m.strip()), pattern.strip()


# The routes whose requests `[proxy] extra_fields` can open up: each dialect route, and LiteLLM's guardrail.
EXTRA_FIELD_ROUTES = (*ROUTES, GUARDRAIL_PATH)


def _route_fields(value: Any, where: str) -> dict[str, frozenset[str]]:
    """`[proxy.extra_fields]`: route path -> the top-level fields forwarded there beyond its API's own. Per route,
    because the same name means different things to different parsers (and one upstream serves several
    APIs): a field allowed for vLLM's chat route must not open the Anthropic or Ollama route."""
    if isinstance(value, (list, tuple)):
        raise ValueError(
            f"{where}: name the route each field is for, as a table: [proxy.extra_fields] "
            f'"/v1/chat/completions" = {list(value)!r} (routes: {", ".join(EXTRA_FIELD_ROUTES)})'
        )
    routes = mapping("route", TEXTS).check(value, where)
    for path in routes:
        if path not in EXTRA_FIELD_ROUTES:
            raise ValueError(f"{where}: {path!r} is not a route the gate screens; routes: {list(EXTRA_FIELD_ROUTES)}")
    return {path: frozenset(names) for path, names in routes.items()}


@dataclass(frozen=True)
class ProxyConfig:
    """What is forwarded besides the screened routes, and in what form images are."""

    # Matched against the canonical path (target.py) with the method.
    allow: tuple[str, ...] = field_of(
        Option(
            texts("list of `[METHODS ]PATTERN`", _path_pattern),
            DEFAULT_PROXY_ALLOW,
            "paths no dialect owns that may be forwarded: fnmatch patterns (`*` spans `/` too); a bare pattern "
            "forwards GET and HEAD without a body, `POST /v1/completions` names its methods",
        )
    )
    # Another decoder may show the upstream another picture (an APNG's frames, pixels under transparency).
    forward_original: bool = field_of(
        Option(
            BOOLEAN,
            False,
            "forward images as sent instead of as the screened pixels (weaker; trusted clients only)",
            flag="--forward-original",
        )
    )
    # The gate cannot screen audio, and llama.cpp decodes audio slots that are not audio as images.
    allow_audio: bool = field_of(
        Option(BOOLEAN, False, "forward `input_audio` parts that parse as their declared WAV or MP3")
    )
    # Per route: one upstream serves several APIs, and a field opened for vLLM's chat route must not open
    # the Anthropic or Ollama route.
    extra_fields: Mapping[str, frozenset[str]] = field_of(
        Option(
            Value("table: route = list of strings", _route_fields),
            {},
            "top-level request fields forwarded beyond each API's own, per route "
            '(`"/v1/chat/completions" = ["top_k", "repetition_penalty"]` for vLLM); '
            "their values must still be free of URLs and encoded data",
        )
    )
    # Beyond proxy.FORWARDED_REQUEST_HEADERS (provider keys, API versions and betas, Accept, request and trace
    # ids). Hop-by-hop headers, those a Connection header names and the gate's own never go, listed or not.
    forward_headers: tuple[str, ...] = field_of(
        Option(
            texts("list of header names", _header_name),
            (),
            "request headers forwarded to the upstream beyond the gate's allow-list (never hop-by-hop ones)",
        )
    )

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


def _forward_limit(help: str) -> Any:
    return field_of(Option(OPTIONAL_COUNT, None, help, default_text=PRESET_DEFAULT))


@dataclass(frozen=True)
class ForwardConfig:
    """At what size images go upstream, within which limits, and how the held key is sent
    (server/forwarding.py has the presets). Keys left unset take the preset's value."""

    preset: str = field_of(
        Option(
            choice(PRESET_NAMES),
            "auto",
            "the upstream's sizes and limits; auto: anthropic for api.anthropic.com, openai for api.openai.com, "
            "azure for *.openai.azure.com, else local",
        )
    )
    # The forward budget: images are scaled down (never up) until each bound holds.
    long_edge: int | None = _forward_limit("longest edge of a forwarded image (scaled down, never up)")
    short_edge: int | None = _forward_limit("shortest edge of a forwarded image (scaled down, never up)")
    max_pixels: int | None = _forward_limit("pixels of a forwarded image (scaled down, never up)")
    # The upstream's limits, checked before it is called (a 413 naming the image instead of its error).
    max_image_base64: int | None = _forward_limit("base64 characters of one forwarded image")
    max_images_base64: int | None = _forward_limit("base64 characters of a request's forwarded images")
    max_request_bytes: int | None = _forward_limit("bytes of the forwarded request")
    max_images: int | None = _forward_limit("images in the forwarded request")
    max_side: int | None = _forward_limit("longest side the upstream takes")
    auth: str = field_of(
        Option(
            choice(AUTH_STYLES),
            "auto",
            "how the held key (SAFECLIP_UPSTREAM_API_KEY) is sent: x-api-key (Anthropic), bearer (OpenAI and "
            "compatible servers), api-key (Azure OpenAI); auto: the preset's, for local servers by the route "
            "(X-Api-Key on /v1/messages, Bearer elsewhere)",
        )
    )

    def plan(self, upstream: str) -> Plan:
        budget = {"long_edge": self.long_edge, "short_edge": self.short_edge, "max_pixels": self.max_pixels}
        limits = {
            name: getattr(self, name)
            for name in ("max_image_base64", "max_images_base64", "max_request_bytes", "max_images", "max_side")
        }
        return resolve(upstream, self.preset, self.auth, budget, limits)


@dataclass(frozen=True)
class ToolsConfig:
    """Server-side tools (the provider fetches or makes content the gate never sees): refused unless listed."""

    allow: tuple[str, ...] = field_of(
        Option(
            texts(f"list of {' | '.join(sorted(SERVER_TOOLS))}", _server_tool),
            (),
            "server-side tools let through (README: what each lets in unscreened)",
        )
    )


@dataclass(frozen=True)
class FetchConfig:
    """How image URLs are fetched by the gate."""

    allow: tuple[IPNetwork, ...] = field_of(
        Option(
            texts("list of CIDRs", _network),
            (),
            "let image URLs reach this private/loopback range (repeatable)",
            flag="--allow",
            metavar="CIDR",
        )
    )
    connect_timeout: float = field_of(Option(SECONDS, 3.0, "seconds to connect to an image's host"))
    timeout: float = field_of(Option(SECONDS, 10.0, "seconds to fetch one image, redirects included"))
    max_redirects: int = field_of(Option(integer(0), 5, "redirects followed, each re-checked"))


@dataclass(frozen=True)
class BatchConfig:
    """How requests share engine calls, and the threads that decode their images."""

    # A few ms of waiting lets concurrent requests share one engine call; the first request pays it.
    delay_ms: float = field_of(
        Option(
            number(0.0, strict=False),
            2.0,
            "longest wait (ms) for other requests to batch with",
            flag="--batch-delay-ms",
        )
    )
    size: int = field_of(BATCH_SIZE)
    max_queued: int = field_of(
        Option(
            integer(1),
            DEFAULT_MAX_QUEUED,
            "images waiting for the engine before requests are answered 503 with Retry-After",
            flag="--max-queued",
        )
    )
    # Apart from the engine's (Pillow releases the GIL there).
    decode_workers: int = field_of(
        Option(
            integer(1),
            max(2, min(8, os.cpu_count() or 2)),
            "threads that decode and resize images",
            flag="--decode-workers",
            default_text="cores, 2 to 8",
        )
    )


@dataclass(frozen=True)
class Timeouts:
    """How long the upstream may take."""

    upstream_connect: float = field_of(Option(SECONDS, 5.0, "seconds to connect to the upstream"))
    # A long generation keeps streaming, a hung one ends.
    upstream_read: float = field_of(
        Option(SECONDS, 600.0, "seconds the upstream may stay silent between two reads", flag="--upstream-timeout")
    )


@dataclass(frozen=True)
class Templates:
    """str.format templates with {category} (the deciding one), {categories} and {probability}."""

    refusal: str = field_of(Option(TEMPLATE, DEFAULT_REFUSAL, "the answer to a refused request"))
    safety_prompt: str = field_of(
        Option(
            TEMPLATE,
            DEFAULT_SAFETY_PROMPT,
            "the system prompt injected into a flagged request (inject)",
            default_text="a notice naming the category and asking the model to leave out the harmful details "
            "(DEFAULT_SAFETY_PROMPT in server/config.py)",
        )
    )


@dataclass(frozen=True)
class GateConfig:
    """The keys outside any table (the engine options among them are shared with `screen`, cli_options.py)."""

    engine: str = field_of(ENGINE)
    upstream: str = field_of(
        Option(
            text("http(s) URL", _upstream),
            "",
            "the LVLM server's root URL, e.g. http://127.0.0.1:8000 or https://api.example.com/openai (without /v1)",
            flag="--upstream",
            default_text="none: guardrail-only, the gate serves /v1/moderations and the LiteLLM guardrail and "
            "forwards nothing",
        )
    )
    host: str = field_of(Option(TEXT, "127.0.0.1", "address to listen on", flag="--host"))
    port: int = field_of(
        Option(Value("TCP port", _port, int), 8080, "port to listen on (0 picks a free one)", flag="--port")
    )
    action: str = field_of(Option(ACTION, "refuse", "what to do with a flagged request", flag="--action"))
    actions: dict[str, str] = field_of(
        Option(
            mapping("CATEGORY", ACTION, parse_actions),
            {},
            "per-category actions (the strictest of the flagged categories' wins)",
            flag="--actions",
            default_text="the global action",
            metavar="CAT=ACTION,...",
        )
    )
    threshold: float | None = field_of(THRESHOLD)
    thresholds: dict[str, float] = field_of(THRESHOLDS)
    disabled: tuple[str, ...] = field_of(DISABLED)
    backend: str = field_of(BACKEND)
    precision: str | None = field_of(PRECISION)
    fail_open: bool = field_of(
        Option(
            BOOLEAN,
            False,
            "forward undecodable images unscreened (counted in /metrics) instead of refusing them",
            flag="--fail-open",
        )
    )
    api_key: str | None = field_of(
        Option(
            optional(TEXT),
            None,
            "require this key from clients; it is never forwarded upstream",
            flag="--api-key",
            env="SAFECLIP_API_KEY",
            default_text="$SAFECLIP_API_KEY, if set",
        )
    )
    upstream_api_key: str | None = field_of(
        Option(
            optional(TEXT),
            None,
            "send this key upstream (the way [forward] auth says), replacing what the client sent",
            flag="--upstream-api-key",
            env="SAFECLIP_UPSTREAM_API_KEY",
            default_text="$SAFECLIP_UPSTREAM_API_KEY, if set",
        )
    )
    audit_log: str | None = field_of(
        Option(
            optional(TEXT),
            None,
            "append one JSON line per screened request to this file ('-' for stdout); its folder must exist",
            flag="--audit-log",
            default_text="off",
        )
    )
    verdict_field: bool = field_of(
        Option(BOOLEAN, False, "add a `safeclip` verdict object to non-streamed JSON responses", flag="--verdict-field")
    )
    cache_size: int = field_of(
        Option(integer(0), 4096, "verdicts kept by image sha256 (0 disables the cache)", flag="--cache-size")
    )
    # The cache also keeps each image's screened PNG, so a resent image costs no decode.
    cache_bytes: int = field_of(Option(integer(0), 256 << 20, "bytes the verdict cache may hold, images included"))
    moderation: dict[str, tuple[str, ...]] = field_of(
        Option(
            mapping("CATEGORY", texts("list of OpenAI moderation categories", _openai_category)),
            {},
            "entries added to (or replacing) the /v1/moderations mapping: our category -> OpenAI categories "
            "([] for none)",
            default_text="see /v1/moderations",
        )
    )
    limits: Limits = _table(Limits)
    proxy: ProxyConfig = _table(ProxyConfig)
    forward: ForwardConfig = _table(ForwardConfig)
    fetch: FetchConfig = _table(FetchConfig)
    batch: BatchConfig = _table(BatchConfig)
    timeouts: Timeouts = _table(Timeouts)
    templates: Templates = _table(Templates)
    tools: ToolsConfig = _table(ToolsConfig)

    @functools.cached_property  # read on every request; the config never changes
    def policies(self) -> Mapping[str, Policy]:
        """What each route's dialect lets through beyond its own allow-lists (see `policy`)."""
        return {
            path: Policy(
                allow_audio=self.proxy.allow_audio,
                extra_fields=self.proxy.extra_fields.get(path, frozenset()),
                tools=frozenset(self.tools.allow),
                max_audio_bytes=self.limits.max_image_bytes,
            )
            for path in EXTRA_FIELD_ROUTES
        }

    def policy(self, path: str) -> Policy:
        """The policy of a route in EXTRA_FIELD_ROUTES: audio and tools as configured, that route's extra fields."""
        return self.policies[path]

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


def options(cls: type = GateConfig, section: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Option]]:
    """(key path, Option) of every option of `cls` and its tables, in declaration order."""
    for f in fields(cls):
        if TABLE in f.metadata:
            yield from options(f.metadata[TABLE], (*section, f.name))
        else:
            yield (*section, f.name), f.metadata[OPTION]


# Secrets: never read from the config file, never in the policy fingerprint.
SECRETS = tuple((path[-1], option) for path, option in options() if option.env)
SECRET_KEYS = frozenset(key for key, _ in SECRETS)


def build(cls: type, data: Mapping[str, Any], section: str = "") -> Any:
    """A dataclass from a mapping: every key known, every value checked by its Option (errors name the key)."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"[{section}]: unknown key(s) {unknown}; known: {sorted(known)}"
            if section
            else f"unknown top-level key(s) {unknown}; known: {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        label = f"{section}.{name}" if section else name
        if TABLE in f.metadata:
            if not isinstance(value, Mapping):
                raise ValueError(f"{label}: expected a table ([{label}]), got {value!r}")
            kwargs[name] = build(f.metadata[TABLE], value, label)
        else:
            kwargs[name] = f.metadata[OPTION].value.check(value, label)
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
    for key, option in SECRETS:
        if key in data:
            raise ValueError(f"{path}: {key} is not read from files; use {option.flag} or {option.env}")
    return data


def load_config(path: str | Path | None, overrides: Mapping[str, Any]) -> GateConfig:
    """The config file (if any), then `overrides` (CLI flags, shaped like the file), validated."""
    data = merge(read_toml(path) if path else {}, overrides)
    try:
        config = build(GateConfig, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path else str(e)) from None
    for path_, option in options():
        if option.required and not _get(config, path_):
            raise ValueError(f"{'.'.join(path_)} is required ({option.flag} or `{path_[-1]} = ...` in the config file)")
    if config.upstream_api_key and not config.upstream:
        raise ValueError("an upstream API key was given but no upstream (--upstream or `upstream = ...`)")
    return config


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        config = getattr(config, key)
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


REFERENCE_START = "<!-- config reference: generated by `python -m safeclip.runtime.server.config` -->"
REFERENCE_END = "<!-- end of the config reference -->"


def reference() -> str:
    """The README's configuration reference, in markdown: every key of every table, from its declaration."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def rows(cls: type, section: str) -> list[str]:
        out = ["| key | value | default | flag | meaning |", "| --- | --- | --- | --- | --- |"]
        for f in fields(cls):
            if TABLE in f.metadata:
                continue
            option: Option = f.metadata[OPTION]
            table = isinstance(option.default, dict)  # [thresholds], [actions], [moderation]
            key = f"`[{f.name}]`" if table else f"`{f.name}`"
            default = option.shown_default(toml=True)
            if option.default_text is None and not option.required:
                default = f"`{default}`"
            flag = f"`{option.flag}`" if option.flag else ""
            if option.env:
                flag += f", `${option.env}` (never the file)"
            out.append(f"| {key} | {cell(option.value.kind)} | {cell(default)} | {flag} | {cell(option.help)} |")
        return [f"{section}: {' '.join((cls.__doc__ or '').split())}", "", *out]

    lines = [REFERENCE_START, "", *rows(GateConfig, "Top-level keys")]
    for f in fields(GateConfig):
        if TABLE in f.metadata:
            lines += ["", *rows(f.metadata[TABLE], f"`[{f.name}]`")]
    return "\n".join([*lines, "", REFERENCE_END]) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
