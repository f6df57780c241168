"""The allowlist decision as a pure function: patterns, kinds, and the denial message."""

from __future__ import annotations

import pytest

from sidecar.identity import PeerIdentity
from sidecar.policy import AllowRules, Policy

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
