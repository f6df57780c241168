"""A route's per-method rules (`rules:` in the config file): their shape, checked when read.

    rules:
      - name: billing-reads            # optional, shown in denials and logs
        action: allow                  # allow | deny
        cn: [billing]                  # any of cn / dns / uri / ou (lists of globs), or any: true
        methods: ["/kv.KV/Get", "/kv.KV/List"]
        mode: audit                    # optional: enforce (default) | audit

Rules are tried in order and the first that matches both the caller and the method
decides; a call no rule matches is denied. The file shape is a contract: users' files
rely on it. Matching is auth/policy.py's; this module only reads and checks.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from sidecar.errors import ConfigError

Action = Literal["allow", "deny"]
RuleMode = Literal["enforce", "audit"]

# settings.names: checks a list of caller patterns, and returns it as a tuple.
NameCheck = Callable[[list[str], str], tuple[str, ...]]

CALLER_KINDS = ("cn", "dns", "uri", "ou")
_KEYS = ("name", "action", *CALLER_KINDS, "any", "methods", "mode")
# A gRPC method as it appears in :path: /package.Service/Method. Service names are dotted
# identifiers, methods identifiers (protobuf's grammar); `*` stands for every method of a
# service, or alone for every method of every service.
_METHOD_PATTERN = re.compile(r"/[A-Za-z_][A-Za-z0-9_.]*/([A-Za-z_][A-Za-z0-9_]*|\*)")


@dataclass(frozen=True)
class MethodRule:
    """One rule: who (caller names, or any caller), which methods, and what happens."""

    action: Action
    methods: tuple[str, ...]
    cn: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    ou: tuple[str, ...] = ()
    any: bool = False
    name: str | None = None
    mode: RuleMode = "enforce"
    # Where it was written (`sidecar.yaml: routes[0].rules[1]`), for messages.
    where: str = field(default="", compare=False)

    @property
    def title(self) -> str:
        """How denials and logs name the rule: its name, or where it was written."""
        return f"rule {self.name!r}" if self.name else f"rule {self.where.rsplit(': ', 1)[-1]}"

    def covers(self, other: MethodRule) -> bool:
        """Whether every call `other` matches is matched by this rule already (so `other`,
        written after it, never decides anything): this rule takes any caller, or the same
        callers, and at least the same methods."""
        same_callers = self.any or (
            not other.any
            and (other.cn, other.dns, other.uri, other.ou) == (self.cn, self.dns, self.uri, self.ou)
        )
        return same_callers and all(
            any(method_covers(mine, theirs) for mine in self.methods) for theirs in other.methods
        )


def method_covers(pattern: str, method_pattern: str) -> bool:
    """Whether `pattern` matches every method `method_pattern` matches."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return method_pattern != "*" and method_pattern.startswith(pattern[:-1])
    return pattern == method_pattern


def parse_rules(value: object, where: str, names: NameCheck) -> tuple[MethodRule, ...]:
    """The rules a config file gives, or a ConfigError naming `routes[i].rules[j]` and what
    is wrong."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of rules")
    return tuple(_rule(item, f"{where}[{index}]", names) for index, item in enumerate(value))


def _rule(item: object, where: str, names: NameCheck) -> MethodRule:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with action, callers and methods")
    for key in item:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}{hint}; a rule takes {', '.join(_KEYS)}"
            )
    action = item.get("action")
    if action not in ("allow", "deny"):
        raise ConfigError(f"{where}.action: expected allow or deny, got {action!r}")
    mode = item.get("mode", "enforce")
    if mode not in ("enforce", "audit"):
        raise ConfigError(f"{where}.mode: expected enforce or audit, got {mode!r}")
    name = item.get("name")
    if name is not None and (not isinstance(name, str) or not name.isprintable() or not name):
        raise ConfigError(f"{where}.name: expected a printable string")
    callers = {
        kind: _patterns(item.get(kind, []), f"{where}.{kind}", names) for kind in CALLER_KINDS
    }
    any_caller = item.get("any", False)
    if not isinstance(any_caller, bool):
        raise ConfigError(f"{where}.any: expected true or false, got {any_caller!r}")
    if any_caller and any(callers.values()):
        raise ConfigError(f"{where}: any: true cannot be combined with cn, dns, uri or ou")
    if not any_caller and not any(callers.values()):
        raise ConfigError(
            f"{where}: the rule matches no caller: give cn, dns, uri or ou (lists of globs), "
            "or any: true"
        )
    return MethodRule(
        action=action,
        methods=_methods(item.get("methods"), f"{where}.methods"),
        any=any_caller,
        name=name,
        mode=mode,
        where=where,
        **callers,
    )


def _patterns(value: object, where: str, names: NameCheck) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where}: expected a list of strings, e.g. [alice, bob]")
    return names(value, where) if value else ()


def _methods(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list, e.g. [/kv.KV/Get, /kv.KV/*]")
    for method in value:
        if not isinstance(method, str) or not (method == "*" or _METHOD_PATTERN.fullmatch(method)):
            raise ConfigError(
                f"{where}: {method!r} is not a method pattern: /package.Service/Method, "
                "/package.Service/* or *"
            )
    return tuple(value)


def shadowed(rules: tuple[MethodRule, ...]) -> list[str]:
    """One line per rule that an earlier one covers entirely (it never decides a call)."""
    lines = []
    for index, rule in enumerate(rules):
        earlier = next((other for other in rules[:index] if other.covers(rule)), None)
        if earlier is not None:
            lines.append(
                f"{rule.where}: never applies: {earlier.where} before it matches every call "
                "it would"
            )
    return lines
