"""What a configuration reload may change in a running sidecar, and what takes a restart.

A reload (SIGHUP, or a reload_interval check that finds the config file changed)
reads the configuration again from the same flags, environment and file. What
can change in place: each route's allow rules (applied to established connections
too), the files or PEM text of its certificate, key and CA bundle, and its CRLs
(crl, crl_stale); of the
process settings, log_level, drain_grace and reload_interval. Anything else (a
listen address, an upstream, a mode, a data plane, a budget, a route added or
removed, log_format) takes a restart: such a configuration is refused whole, with
one line naming what changed, and the running one stays (the rolling restart of
the README applies it without a failed call).
"""

from __future__ import annotations

from dataclasses import fields

from sidecar.config.limits import Limits
from sidecar.config.model import Config, RouteConfig

# The route fields a running route takes from a new configuration.
ROUTE_FIELDS_IN_PLACE = frozenset({"allow", "cert", "key", "ca", "crl", "crl_stale"})
# The process settings a running sidecar takes from a new configuration.
PROCESS_FIELDS_IN_PLACE = frozenset({"log_level", "drain_grace", "reload_interval"})


def route_key(route: RouteConfig, index: int) -> str | int:
    """How a route is recognised across reloads: its name, or its place when it has none."""
    return route.name if route.name is not None else index


def needs_restart(running: Config, new: Config) -> str | None:
    """Why the new configuration cannot be applied to the running sidecar, in one line naming
    what changed; None when everything that differs can change in place."""
    old_routes = {route_key(route, i): route for i, route in enumerate(running.routes)}
    new_routes = {route_key(route, i): route for i, route in enumerate(new.routes)}
    changes: list[str] = []
    changes += [f"{_name(key)} added" for key in new_routes if key not in old_routes]
    changes += [f"{_name(key)} removed" for key in old_routes if key not in new_routes]
    for key, old in old_routes.items():
        if key in new_routes:
            changes += [
                f"{new_routes[key].label(field)} changed"
                for field in _differing(old, new_routes[key])
                if field not in ROUTE_FIELDS_IN_PLACE
            ]
    changes += [
        f"{field} changed"
        for field in _differing(running, new)
        if field != "routes" and field not in PROCESS_FIELDS_IN_PLACE
    ]
    if not changes:
        return None
    return f"{'; '.join(changes)}: {'this takes' if len(changes) == 1 else 'these take'} a restart"


def _name(key: str | int) -> str:
    return f"route {key!r}" if isinstance(key, str) else f"routes[{key}]"


def _differing(old: object, new: object) -> list[str]:
    """The compared fields that differ between two configuration values of one class (a
    route's budgets by their own names, as the settings call them)."""
    differing = []
    for field in fields(old):  # type: ignore[arg-type]
        if not field.compare:
            continue
        before, after = getattr(old, field.name), getattr(new, field.name)
        if isinstance(before, Limits):
            differing += _differing(before, after)
        elif before != after:
            differing.append(field.name)
    return differing
