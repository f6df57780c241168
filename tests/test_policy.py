"""The allowlist decision as a pure function: patterns, kinds, and the denial message."""

from __future__ import annotations

import pytest

from sidecar.auth.identity import PeerIdentity
from sidecar.auth.policy import Policy
from sidecar.config.model import AllowRules
from sidecar.config.rules import MethodRule

CAROL = PeerIdentity(
    common_names=("carol",),
    dns_names=("carol.svc.example.org",),
    uris=("spiffe://example.org/ns/prod/sa/carol",),
    ip_addresses=("10.1.2.3",),
)


@pytest.mark.parametrize(
    ("rules", "allowed"),
    [
        (AllowRules(cn=("carol",)), True),
        (AllowRules(cn=("*",)), True),
        (AllowRules(cn=("carol.svc.example.org",)), False),  # a CN rule never matches a SAN
        (AllowRules(dns=("carol",)), False),  # nor a DNS rule the CN
        (AllowRules(dns=("*.svc.example.org",)), True),
        (AllowRules(dns=("*.example.org",)), False),
        (AllowRules(dns=("**.example.org",)), True),
        (AllowRules(dns=("**",)), True),
        (AllowRules(dns=("carol.svc.example.org.",)), False),
        (AllowRules(dns=("Carol.SVC.example.org",)), True),
        (AllowRules(uri=("spiffe://example.org/ns/prod/sa/carol",)), True),
        (AllowRules(uri=("spiffe://example.org/ns/*/sa/carol",)), True),
        (AllowRules(uri=("spiffe://example.org/*/carol",)), False),
        (AllowRules(uri=("spiffe://example.org/**/carol",)), True),
        (AllowRules(uri=("spiffe://EXAMPLE.org/ns/prod/sa/carol",)), False),
        (AllowRules(uri=("spiffe://example.org/ns/prod/sa/carol?x",)), False),  # '?' is literal
        (AllowRules(cn=("c.rol",)), False),  # '.' is literal, not a regex wildcard
        (AllowRules(allow_all=True), True),
    ],
    ids=repr,
)
def test_rules_match_the_names_of_their_kind(rules: AllowRules, allowed: bool) -> None:
    assert Policy(rules).decide(CAROL, "/kv.KV/Get").allowed is allowed


def test_denial_names_identity_and_method() -> None:
    decision = Policy(AllowRules(cn=("alice",))).decide(CAROL, "/kv.KV/Get")
    assert not decision.allowed
    assert decision.reason == (
        "peer CN=carol, DNS=carol.svc.example.org, URI=spiffe://example.org/ns/prod/sa/carol, "
        "IP=10.1.2.3 is not allowed to call /kv.KV/Get"
    )


def test_allow_names_the_rule_that_matched() -> None:
    decision = Policy(AllowRules(cn=("bob",), dns=("*.svc.example.org",))).decide(CAROL, "/m")
    assert decision.allowed
    assert decision.reason == "allow-dns *.svc.example.org"


def test_caller_without_certificate_is_denied_unless_allow_all() -> None:
    assert not Policy(AllowRules(cn=("*",))).decide(None, "/m").allowed
    assert Policy(AllowRules(allow_all=True)).decide(None, "/m").allowed


def test_spiffe_id_is_the_spiffe_uri() -> None:
    assert CAROL.spiffe_id == "spiffe://example.org/ns/prod/sa/carol"
    assert PeerIdentity(common_names=("x",), uris=("https://a.example",)).spiffe_id is None


@pytest.mark.parametrize(
    "name",
    [
        "adm\u0131n.example.com",  # dotless i: Unicode folding takes it for I
        "\u212aube.example.com",  # Kelvin sign: Unicode folding takes it for K
        "admin.example.com\u200b",  # zero-width space
        "admin.example.com\n",
    ],
    ids=ascii,
)
def test_dns_name_that_is_not_printable_ascii_matches_no_rule_not_even_a_wildcard(
    name: str,
) -> None:
    policy = Policy(AllowRules(dns=("admin.example.com", "kube.example.com", "**")))
    decision = policy.decide(PeerIdentity(dns_names=(name,)), "/m")
    assert not decision.allowed
    assert decision.reason.isascii() and decision.reason.isprintable()


def test_dns_rules_still_fold_ascii_letters() -> None:
    policy = Policy(AllowRules(dns=("admin.example.com",)))
    assert policy.decide(PeerIdentity(dns_names=("ADMIN.Example.COM",)), "/m").allowed


@pytest.mark.parametrize("common_name", ["alice\n", "ali\x1bce", "al\u0456ce", "alice\u2028"])
def test_cn_with_controls_or_non_ascii_letters_matches_no_cn_rule(common_name: str) -> None:
    policy = Policy(AllowRules(cn=("alice", "al*", "*")))
    assert not policy.decide(PeerIdentity(common_names=(common_name,)), "/m").allowed


def test_several_cns_match_no_cn_rule_but_the_sans_still_count() -> None:
    several = PeerIdentity(common_names=("mallory", "alice"), dns_names=("m.example.org",))
    assert several.common_name is None
    assert not Policy(AllowRules(cn=("alice", "mallory", "*"))).decide(several, "/m").allowed
    assert Policy(AllowRules(dns=("m.example.org",))).decide(several, "/m").allowed
    assert several.description == "CN=mallory, CN=alice, DNS=m.example.org, several CNs"


def test_identity_whose_names_could_not_be_read_matches_nothing() -> None:
    unreadable = PeerIdentity(common_names=("alice",), serial="1f", unreadable="bad DER\n")
    decision = Policy(AllowRules(cn=("alice", "*"), dns=("**",))).decide(unreadable, "/m")
    assert not decision.allowed
    assert decision.reason == (
        r"peer certificate serial 1f, CN=alice, names unreadable: bad DER\n "
        "is not allowed to call /m"
    )


def test_denial_escapes_the_method_and_the_names() -> None:
    mallory = PeerIdentity(common_names=("mal\u0131ory\x1b[2J",), uris=("spiffe://x/\\n",))
    decision = Policy(AllowRules(cn=("alice",))).decide(mallory, "/kv.KV/Get\nforged\u2028")
    assert decision.reason == (
        r"peer CN=mal\u0131ory\x1b[2J, URI=spiffe://x/\\n is not allowed to call "
        r"/kv.KV/Get\nforged\u2028"
    )


def test_description_of_a_certificate_with_many_long_names_is_bounded() -> None:
    crowded = PeerIdentity(dns_names=tuple(f"{i}.{'x' * 300}.example" for i in range(1000)))
    assert len(crowded.description) < 16 * 300
    assert crowded.description.endswith(", 984 more names")
    assert "...(311 characters)" in crowded.description


# Per-method rules: first match wins, no match denies, allow_* callers may call everything.

OPS = PeerIdentity(common_names=("ops",), organizational_units=("platform",))


METHOD_RULES = AllowRules(
    cn=("admin",),
    rules=(
        MethodRule("allow", ("/kv.KV/Get",), cn=("carol",), name="carol-reads"),
        MethodRule("allow", ("/kv.KV/Put",), ou=("platform",), where="routes[0].rules[1]"),
        MethodRule("deny", ("/kv.KV/*",), any=True, name="no-kv"),
        MethodRule("allow", ("*",), cn=("carol",), name="carol-everything"),
    ),
)


@pytest.mark.parametrize(
    ("identity", "method", "allowed", "reason"),
    [
        (CAROL, "/kv.KV/Get", True, "rule 'carol-reads'"),
        (CAROL, "/kv.KV/Delete", False, "(rule 'no-kv')"),  # first match wins, not the last
        (CAROL, "/other.Svc/Call", True, "rule 'carol-everything'"),
        (OPS, "/kv.KV/Put", True, "rule routes[0].rules[1]"),
        (OPS, "/kv.KV/Get", False, "(rule 'no-kv')"),
        (OPS, "/other.Svc/Call", False, "is not allowed to call /other.Svc/Call (no rule matched)"),
        (PeerIdentity(common_names=("admin",)), "/kv.KV/Delete", True, "allow-cn admin"),
        (OPS, "/kv.KV/Get/extra", False, "(no rule matched)"),  # /kv.KV/* is one method deep
    ],
)
def test_method_rules_first_match_wins_and_no_match_denies(
    identity: PeerIdentity, method: str, allowed: bool, reason: str
) -> None:
    decision = Policy(METHOD_RULES).decide(identity, method)
    assert decision.allowed is allowed
    assert reason in decision.reason, decision.reason


def test_a_caller_no_rule_can_allow_is_not_admitted_and_allow_callers_skip_per_call() -> None:
    policy = Policy(METHOD_RULES)
    mallory = PeerIdentity(common_names=("mallory",))
    assert not policy.admits(mallory)  # only a deny rule matches it: refused whole
    assert policy.admits(CAROL) and policy.per_call(CAROL)
    assert policy.admits(OPS) and policy.per_call(OPS)
    admin = PeerIdentity(common_names=("admin",))
    assert policy.admits(admin) and not policy.per_call(admin)  # every method: no checks


def test_a_reload_replaces_the_method_rules_at_once() -> None:
    policy = Policy(METHOD_RULES)
    assert policy.decide(CAROL, "/kv.KV/Get").allowed
    policy.replace(AllowRules(rules=(MethodRule("deny", ("*",), cn=("carol",)),)))
    assert not policy.decide(CAROL, "/kv.KV/Get").allowed
    assert not policy.admits(CAROL)
