"""Gather settings from the config file, the environment and the flags into one Config.

Precedence, per setting: flags > environment (`SIDECAR_<KEY>`) > file > defaults.
A list given at a higher level replaces the lower one (no merging of allowlists).
A file holds one route at its top level, or several under `routes:`; with
`routes:`, the top level holds only process settings, and flags or environment
variables for route settings are refused rather than guessed at (which route
would they change?). Paths in a file are relative to the file's directory.
Top-level keys starting with `x-` are ignored, so they can hold YAML anchors.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar.config.limits import LIMIT_KEYS, Limits
from sidecar.config.model import (
    DEFAULT_INGRESS_LISTEN,
    AllowRules,
    Config,
    RouteConfig,
    certificate_hex,
)
from sidecar.config.pem import read_bytes
from sidecar.config.settings import (
    BY_KEY,
    CREDENTIAL_KEYS,
    ENV_PREFIX,
    PROCESS_KEYS,
    REQUIRED_ROUTE_KEYS,
    ROUTE_KEYS,
    SPIFFE_ENDPOINT_ENV,
    Value,
    files,
    from_file,
    from_text,
    names,
)
from sidecar.errors import ConfigError

# The environment variable naming the config file, as --config does.
CONFIG_ENV = ENV_PREFIX + "CONFIG"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Given:
    """A setting's value and where it came from (`--cert`, `SIDECAR_CERT`, `f.yaml: cert`)."""

    value: Value
    where: str


Layer = dict[str, Given]


@dataclass(frozen=True)
class Loaded:
    """The configuration, with where each setting came from and what was ignored."""

    config: Config
    sources: tuple[Layer, ...]  # per route: the winning source of each setting
    process_sources: Layer
    warnings: tuple[str, ...]
    config_file: str | None = None


def load(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    config_file: str | None = None,
    file_bytes: bytes | None = None,
) -> Loaded:
    """Build the Config from all three sources; raise ConfigError naming the setting at fault.

    flags maps setting keys to what the command line gave: a string, a list of
    strings (repeatable flags) or True (switches); absent keys were not given.
    file_bytes: the config file's content, read before (its paths stay relative to it).
    """
    warnings: list[str] = []
    try:
        return _load(flags, environ, config_file, file_bytes, warnings)
    except ConfigError as error:
        # The error may come from a variable that was ignored as misspelled: name it too.
        error.note = next((warning for warning in warnings if "did you mean" in warning), None)
        raise


def _load(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    config_file: str | None,
    file_bytes: bytes | None,
    warnings: list[str],
) -> Loaded:
    env = _from_environment(environ, warnings)
    top, routes = _read_file(config_file, file_bytes) if config_file else ({}, None)
    cli = {key: Given(_flag_value(key, raw), BY_KEY[key].flag_name) for key, raw in flags.items()}

    process: Layer = {}
    for key in PROCESS_KEYS:
        for layer in (top, env, cli):
            if key in layer:
                process[key] = layer[key]

    if routes is None:
        single: Layer = {}
        for layer in (top, env, cli):
            single.update((key, given) for key, given in layer.items() if key in ROUTE_KEYS)
        route_layers: list[tuple[Layer, str | None]] = [(single, None)]
    else:
        for layer in (env, cli):
            for key, given in layer.items():
                if key in ROUTE_KEYS:
                    raise ConfigError(
                        f"{given.where}: {config_file} declares routes:, so {key} must be set "
                        "inside each route"
                    )
        route_layers = [(layer, f"{config_file}: routes[{index}]") for index, layer in routes]

    endpoint = environ.get(SPIFFE_ENDPOINT_ENV)
    if endpoint:
        for layer, _ in route_layers:
            if not any(key in layer for key in ("spiffe_socket", *CREDENTIAL_KEYS)):
                value = from_text(BY_KEY["spiffe_socket"], endpoint, SPIFFE_ENDPOINT_ENV)
                layer["spiffe_socket"] = Given(value, SPIFFE_ENDPOINT_ENV)
    config = Config(
        routes=tuple(_route(layer, location, config_file) for layer, location in route_layers),
        **{key: given.value for key, given in process.items()},  # type: ignore[arg-type]
    )
    if config.workers > 1:
        for route in config.routes:
            if route.data_plane != "splice":
                raise ConfigError(
                    f"{route.label('data_plane')} {route.data_plane} serves from one process, "
                    f"and {process['workers'].where} is {config.workers}: use data_plane "
                    "splice, or one worker"
                )
    if config.admin is not None and not config.admin.is_loopback and not config.unsafe_admin:
        raise ConfigError(
            f"{process['admin'].where} {config.admin} is not on loopback: the admin listener "
            "has no authentication (its /status names every route); set unsafe_admin to "
            "allow it"
        )
    return Loaded(
        config,
        tuple(layer for layer, _ in route_layers),
        process,
        tuple(warnings),
        config_file,
    )


def _route(layer: Layer, location: str | None, config_file: str | None) -> RouteConfig:
    mode = layer["mode"].value if "mode" in layer else "ingress"
    required = [*REQUIRED_ROUTE_KEYS, *(("listen",) if mode == "egress" else ())]
    if "spiffe_socket" in layer:
        given = [key for key in CREDENTIAL_KEYS if key in layer]
        if given:
            where = layer["spiffe_socket"].where
            raise ConfigError(
                f"{where} replaces cert, key and ca, but {layer[given[0]].where} is given too: "
                "keep one or the other"
            )
    else:
        required += CREDENTIAL_KEYS
    missing = [key for key in required if key not in layer]
    if missing and location:
        raise ConfigError(f"{location}: missing {', '.join(missing)}")
    if missing and config_file:
        raise ConfigError(
            f"missing {', '.join(missing)} (keys in {config_file}, SIDECAR_* variables or flags)"
        )
    if missing:
        flags = ", ".join(BY_KEY[key].flag_name for key in missing)
        raise ConfigError(f"missing {flags} (flags, SIDECAR_* variables or a --config file)")

    def get(key: str) -> Any:
        given = layer.get(key)
        return given.value if given is not None else BY_KEY[key].default

    def label(key: str) -> str:
        given = layer.get(key)
        return given.where if given is not None else key

    return RouteConfig(
        mode=mode,  # type: ignore[arg-type]
        listen=get("listen") or DEFAULT_INGRESS_LISTEN,
        upstream=get("upstream"),
        cert=get("cert"),
        key=get("key"),
        ca=get("ca"),
        spiffe_socket=get("spiffe_socket"),
        allow=AllowRules(
            cn=get("allow_cn"),
            dns=get("allow_dns"),
            uri=get("allow_uri"),
            ou=get("allow_ou"),
            allow_all=get("allow_all"),
            rules=get("rules"),
            rules_mode=get("rules_mode"),
            deny_serials=certificate_hex(
                get("deny_serials"), label("deny_serials"), fingerprint=False
            ),
            deny_fingerprints=certificate_hex(
                get("deny_fingerprints"), label("deny_fingerprints"), fingerprint=True
            ),
        ),
        crl=get("crl"),
        crl_stale=get("crl_stale"),
        server_name=get("server_name"),
        session_tickets=get("session_tickets"),
        unsafe_upstream=get("unsafe_upstream"),
        unsafe_listen=get("unsafe_listen"),
        data_plane=get("data_plane"),
        identity_header=get("identity_header"),
        identity_header_fields=get("identity_header_fields"),
        grpc_health=get("grpc_health"),
        upstream_health_check=get("upstream_health_check"),
        name=get("name"),
        limits=Limits(**{key: get(key) for key in LIMIT_KEYS}),
        where={key: given.where for key, given in layer.items()},
        location=location,
        from_file=config_file is not None,
    )


def _flag_value(key: str, raw: object) -> Value:
    setting = BY_KEY[key]
    where = setting.flag_name
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, list):  # a repeatable flag: one pattern (or file) per use, commas kept
        items = [str(item) for item in raw]
        return files(items, where) if setting.kind == "files" else names(items, where)
    return from_text(setting, str(raw), where)


def _from_environment(environ: Mapping[str, str], warnings: list[str]) -> Layer:
    layer: Layer = {}
    by_variable = {setting.env_name: setting for setting in BY_KEY.values() if setting.flag}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        setting = by_variable.get(name.upper())  # the key's case does not matter
        if setting is None:
            # A warning, not an error: orchestrators set variables of their own
            # with this prefix (Kubernetes: SIDECAR_SERVICE_HOST for a service
            # named "sidecar").
            settable = [setting.key for setting in by_variable.values()]
            hint = _did_you_mean(name[len(ENV_PREFIX) :].lower(), settable, ENV_PREFIX)
            warnings.append(f"ignoring {name}: not a setting{hint}")
            continue
        layer[setting.key] = Given(from_text(setting, text, name), name)
    return layer


def _read_file(
    path_text: str, file_bytes: bytes | None = None
) -> tuple[Layer, list[tuple[int, Layer]] | None]:
    """The file's top-level settings, and its routes when it has a `routes:` list. file_bytes:
    its content as read before (a worker's, runtime/workers.py), instead of reading it."""
    path = Path(path_text)
    try:
        # Only a regular file of sane size (not a FIFO, not /dev/zero).
        raw = read_bytes(path, "--config") if file_bytes is None else file_bytes
        text = raw.decode("utf-8")
        document = yaml.load(text, Loader=_StrictLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: {problem}{at}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(document).__name__}")

    base = path.parent
    # Top-level `x-` keys are free for YAML anchors, as in compose files.
    document = {key: value for key, value in document.items() if not str(key).startswith("x-")}
    if "routes" in document and document["routes"] is None:
        raise ConfigError(f"{path_text}: routes: expected a non-empty list of routes")
    routes_document = document.pop("routes", None)
    allowed = (*PROCESS_KEYS, *ROUTE_KEYS) if routes_document is None else PROCESS_KEYS
    top = _settings(document, allowed, f"{path_text}: ", base, extra=("routes",))
    if routes_document is None:
        return top, None
    if not isinstance(routes_document, list) or not routes_document:
        raise ConfigError(f"{path_text}: routes: expected a non-empty list of routes")
    routes = []
    for index, item in enumerate(routes_document):
        prefix = f"{path_text}: routes[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{prefix}: expected a mapping of route settings")
        routes.append((index, _settings(item, ROUTE_KEYS, f"{prefix}.", base)))
    return top, routes


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the
    last one silently, so `allow_cn` written twice would quietly drop names)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # `<<: *anchor` merges may be overridden by explicit keys
            key = key_node.value
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _settings(
    document: dict[Any, Any],
    allowed: tuple[str, ...],
    prefix: str,
    base: Path,
    extra: tuple[str, ...] = (),
) -> Layer:
    layer: Layer = {}
    for key, value in document.items():
        where = f"{prefix}{key}"
        if key not in allowed:
            if key in ROUTE_KEYS:
                raise ConfigError(
                    f"{where}: with routes:, route settings go inside each route "
                    f"(the top level takes {', '.join(PROCESS_KEYS)})"
                )
            if key in PROCESS_KEYS:
                raise ConfigError(f"{where}: {key} is process-wide; set it at the top level")
            hint = _did_you_mean(str(key), [*allowed, *extra])
            raise ConfigError(f"{where}: unknown setting{hint}")
        layer[key] = Given(from_file(BY_KEY[key], value, where, base), where)
    return layer


def _did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0].upper() if prefix else close[0]}?)" if close else ""
