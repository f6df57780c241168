"""`sidecar --check-config`: the effective configuration as YAML, each value with its source.

Private keys are never printed: a key given inline shows as `<inline private key,
redacted>`. The output (without inline PEM) is itself a valid config file.
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

from sidecar.config.addresses import Address
from sidecar.config.limits import LIMIT_KEYS
from sidecar.config.model import RouteConfig
from sidecar.config.pem import PemSource
from sidecar.config.rules import CALLER_KINDS, MethodRule
from sidecar.config.settings import PROCESS_KEYS, ROUTE_KEYS, Value
from sidecar.config.sources import Given, Loaded
from sidecar.pki.tls import TLSMaterial


def render(loaded: Loaded, materials: Sequence[TLSMaterial]) -> str:
    """The effective configuration; materials are the routes' validated credentials, in order."""
    config = loaded.config
    lines = ["# sidecar: configuration is valid; each value is followed by its source"]
    if loaded.config_file:
        lines.append(f"# file: {loaded.config_file}")
    file_prefix = f"{loaded.config_file}: " if loaded.config_file else None

    def line(indent: str, key: str, value: Value, given: Given | None, **kw: object) -> str:
        source = "default" if given is None else given.where
        if file_prefix and source.startswith(file_prefix):
            source = "file"
        return _line(indent, key, value, source, **kw)  # type: ignore[arg-type]

    for key in PROCESS_KEYS:
        lines.append(line("", key, getattr(config, key), loaded.process_sources.get(key)))
    several = len(config.routes) > 1 or config.routes[0].location is not None
    if several:
        lines.append("routes:")
    for route, layer, material in zip(config.routes, loaded.sources, materials, strict=True):
        indent = "  " if several else ""
        first = True
        for key in ROUTE_KEYS:
            value = _route_value(route, key)
            if value is None:
                continue
            text = line(
                indent,
                key,
                value,
                layer.get(key),
                material=material if key in ("cert", "spiffe_socket") else None,
            )
            if several and first:
                text = "- " + text[2:]
                first = False
            lines.append(text)
    return "\n".join(lines) + "\n"


def _route_value(route: RouteConfig, key: str) -> Value | None:
    if key == "rules":
        return route.allow.rules or None
    if key == "crl":
        return route.crl or None
    if key == "crl_stale":
        return route.crl_stale if route.crl else None
    if key == "rules_mode":
        return route.allow.rules_mode
    if key in ("deny_serials", "deny_fingerprints"):
        return tuple(sorted(getattr(route.allow, key))) or None
    if key.startswith("allow_"):
        allow = route.allow
        value = getattr(allow, key if key == "allow_all" else key.removeprefix("allow_"))
        return value if value else None
    if key in LIMIT_KEYS:
        return getattr(route.limits, key)  # type: ignore[no-any-return]
    value = getattr(route, key)
    if key in ("unsafe_upstream", "unsafe_listen") and not value:
        return None
    return value  # type: ignore[no-any-return]


def _line(
    indent: str, key: str, value: Value, source: str, material: TLSMaterial | None = None
) -> str:
    if material is not None:
        leaf = material.leaf
        source += (
            f"; {leaf.subject.rfc4514_string()}, valid until {leaf.not_valid_after_utc:%Y-%m-%d}"
        )
    return f"{indent}{key}: {_scalar(key, value)}  # {source}"


def _scalar(key: str, value: Value) -> str:
    if isinstance(value, PemSource):
        if value.path is not None:
            return _yaml(str(value.path))
        return "<inline private key, redacted>" if key == "key" else "<inline PEM>"
    if isinstance(value, Address):
        return _yaml(value.target)
    if isinstance(value, tuple) and value and isinstance(value[0], PemSource):
        return _yaml([str(source.path) if source.path else "<inline PEM>" for source in value])
    if isinstance(value, tuple) and value and isinstance(value[0], MethodRule):
        return _yaml([_rule(rule) for rule in value])
    if isinstance(value, tuple):
        return _yaml(list(value))
    return _yaml(value)


def _rule(rule: MethodRule) -> dict[str, object]:
    """A method rule as the config file writes it (keys left at their default omitted)."""
    written: dict[str, object] = {"name": rule.name} if rule.name else {}
    written["action"] = rule.action
    for kind in CALLER_KINDS:
        if getattr(rule, kind):
            written[kind] = list(getattr(rule, kind))
    if rule.any:
        written["any"] = True
    written["methods"] = list(rule.methods)
    if rule.mode != "enforce":
        written["mode"] = rule.mode
    return written


def _yaml(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()
