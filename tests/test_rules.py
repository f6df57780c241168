"""The `rules:` list of a route as the config file gives it: its shape, refused with one line
naming routes[i].rules[j] when wrong, and dead rules found."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.config.rules import MethodRule, shadowed
from sidecar.config.sources import load
from sidecar.errors import ConfigError
from tests.conftest import Pki


def _load(tmp_path: Path, pki: Pki, rules: object) -> tuple[MethodRule, ...]:
    route = {
        "name": "kv", "upstream": "127.0.0.1:50051", "listen": "127.0.0.1:0",
        "cert": str(pki.cert("server")), "key": str(pki.key("server")),
        "ca": str(pki.dir / "ca.pem"), "rules": rules,
    }  # fmt: skip
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"routes": [route]}))
    return load({}, {}, str(path)).config.routes[0].allow.rules


def test_the_contract_shape_is_read_as_written(tmp_path: Path, pki: Pki) -> None:
    rules = _load(tmp_path, pki, [
        {"name": "billing-reads", "action": "allow", "cn": ["billing"],
         "methods": ["/kv.KV/Get", "/kv.KV/List"], "mode": "audit"},
        {"action": "deny", "any": True, "methods": ["/kv.KV/*"]},
        {"action": "allow", "dns": "*.svc", "uri": ["spiffe://x/**"], "ou": ["ops"],
         "methods": "*"},
    ])  # fmt: skip
    assert rules[0] == MethodRule(
        "allow", ("/kv.KV/Get", "/kv.KV/List"), cn=("billing",), name="billing-reads",
        mode="audit",
    )  # fmt: skip
    assert rules[1].any and rules[1].action == "deny" and rules[1].methods == ("/kv.KV/*",)
    assert (rules[2].dns, rules[2].uri, rules[2].ou, rules[2].methods) == (
        ("*.svc",),
        ("spiffe://x/**",),
        ("ops",),
        ("*",),
    )
    assert rules[1].title == "rule routes[0].rules[1]"


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ([{"action": "allow", "cn": ["a"], "methods": ["*"], "metods": 1}],
         "routes[0].rules[0]: unknown key 'metods' (did you mean methods?)"),
        ([{"action": "permit", "cn": ["a"], "methods": ["*"]}],
         "routes[0].rules[0].action: expected allow or deny"),
        ([{"action": "allow", "methods": ["*"]}], "routes[0].rules[0]: the rule matches no caller"),
        ([{"action": "allow", "any": True, "cn": ["a"], "methods": ["*"]}],
         "any: true cannot be combined"),
        ([{"action": "allow", "cn": ["a"], "methods": ["kv.KV/Get"]}],
         "routes[0].rules[0].methods: 'kv.KV/Get' is not a method pattern"),
        ([{"action": "allow", "cn": ["a"], "methods": ["/kv.KV/G*t"]}], "is not a method pattern"),
        ([{"action": "allow", "cn": ["a"], "methods": ["/kv.KV/Get/x"]}],
         "is not a method pattern"),
        ([{"action": "allow", "cn": ["a"], "methods": []}], "expected a non-empty list"),
        ([{"action": "allow", "cn": ["a"], "methods": ["*"], "mode": "dry-run"}],
         "routes[0].rules[0].mode: expected enforce or audit"),
        ([{"action": "allow", "cn": [""], "methods": ["*"]}], "routes[0].rules[0].cn: empty name"),
        (["allow alice"], "routes[0].rules[0]: expected a mapping"),
        ([], "expected a non-empty list of rules"),
        ({"action": "allow"}, "expected a non-empty list of rules"),
    ],
)  # fmt: skip
def test_a_malformed_rule_is_one_line_naming_it(
    tmp_path: Path, pki: Pki, rules: object, expected: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, pki, rules)
    assert expected in str(raised.value), str(raised.value)


def test_a_rule_an_earlier_one_covers_is_found_dead() -> None:
    rules = (
        MethodRule("deny", ("/kv.KV/*",), any=True, where="routes[0].rules[0]"),
        MethodRule("allow", ("/kv.KV/Get",), cn=("a",), where="routes[0].rules[1]"),
        MethodRule("allow", ("/other.S/Get",), cn=("a",), where="routes[0].rules[2]"),
        MethodRule("allow", ("/other.S/Get", "/kv.KV/Put"), cn=("a",), where="routes[0].rules[3]"),
    )
    # rules[3] is dead too, but only rules[0] and rules[2] together cover it: a rule is
    # reported when one earlier rule covers it (a cheap check that never errs).
    assert shadowed(rules) == [
        "routes[0].rules[1]: never applies: routes[0].rules[0] before it matches every call "
        "it would",
    ]
