"""Who may call: the allowlist, decided per call as a pure function of (identity, method).

First the allow_* callers: a caller any of whose names matches any pattern of the
matching kind (`allow_cn` against the subject CN, `allow_dns` against DNS SANs,
`allow_uri` against URI SANs, SPIFFE IDs included, `allow_ou` against the subject's
OUs) may call every method. Then the per-method rules (config/rules.py), in order:
the first whose callers and methods both match decides, allow or deny (a deny rule in
audit mode allows, and the decision carries the denial for the log); a call no rule
matches is denied. Patterns are exact names or globs: `*` matches within one label
(no `.` for CN, DNS and OU, no `/` for URIs), `**` matches across labels. DNS names
compare case-insensitively (RFC 4343), folding ASCII letters only; the others
exactly. No I/O here: the policy is easy to test exhaustively and to swap atomically.

Only names in printable ASCII can match. DNS and URI SANs are IA5String (RFC
5280), ASCII by definition; a CA that signs `adm\u0131n.example.com` (dotless i)
or `\u212aube` (Kelvin sign) has signed a name that is not what it looks like,
and Unicode case folding would take it for `admin` / `kube`. Likewise a CN with
a control character or a non-ASCII letter, a certificate with several CNs (which
one names the subject depends on the reader), and one whose names cannot be read
at all: none of these matches a rule of its kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sidecar.auth.identity import PeerIdentity
from sidecar.config.model import AllowRules
from sidecar.config.rules import MethodRule
from sidecar.observe.logs import escape
from sidecar.pki.revocation import Revocations


def compile_pattern(pattern: str, separator: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """Compile an allow pattern into an anchored regular expression.

    ignore_case folds ASCII letters only: Unicode folding takes the Kelvin sign for K
    and the dotless i for I.
    """
    parts = []
    for index, chunk in enumerate(pattern.split("**")):
        if index:
            parts.append(".*")
        parts.append(f"[^{re.escape(separator)}]*".join(re.escape(s) for s in chunk.split("*")))
    return re.compile("".join(parts), re.ASCII | (re.IGNORECASE if ignore_case else 0))


def matchable(name: str) -> bool:
    """Whether a certificate name may match a rule at all: printable ASCII only."""
    return name.isascii() and name.isprintable()


REVOKED = "revoked"  # what denies a revoked caller (Decision.rule)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # For a denial, the message the caller receives (printable ASCII: caller-controlled
    # text in it is escaped, so it can go into a log line as it is); for an allow, the rule.
    reason: str
    # An allow that a rule in audit mode would have denied: the denial, for the log.
    audit: str | None = None
    # For a denial, what denied it, as a bounded label (the metrics count denials by it):
    # a deny rule's title, "no rule matched", "not allowed" (no allow_* rule and no method
    # rule for it), "revoked", "no certificate".
    rule: str = ""


@dataclass(frozen=True)
class _Pattern:
    kind: str  # the flag that declared it, for the audit trail
    pattern: str
    regex: re.Pattern[str] = field(compare=False)

    def matches(self, names: tuple[str, ...]) -> bool:
        return any(self.regex.fullmatch(name) for name in names if matchable(name))


@dataclass(frozen=True)
class _Callers:
    """Caller patterns of each kind (OR'd), compiled."""

    cn: tuple[_Pattern, ...]
    dns: tuple[_Pattern, ...]
    uri: tuple[_Pattern, ...]
    ou: tuple[_Pattern, ...]

    @classmethod
    def of(
        cls,
        cn: tuple[str, ...],
        dns: tuple[str, ...],
        uri: tuple[str, ...],
        ou: tuple[str, ...],
        prefix: str = "allow-",
    ) -> _Callers:
        return cls(
            tuple(_Pattern(f"{prefix}cn", p, compile_pattern(p, ".")) for p in cn),
            tuple(
                _Pattern(f"{prefix}dns", p, compile_pattern(p, ".", ignore_case=True)) for p in dns
            ),
            tuple(_Pattern(f"{prefix}uri", p, compile_pattern(p, "/")) for p in uri),
            tuple(_Pattern(f"{prefix}ou", p, compile_pattern(p, ".")) for p in ou),
        )

    def match(self, identity: PeerIdentity) -> _Pattern | None:
        """The first pattern one of the caller's names matches."""
        common_names = (identity.common_name,) if identity.common_name is not None else ()
        for patterns, names in (
            (self.cn, common_names),
            (self.dns, identity.dns_names),
            (self.uri, identity.uris),
            (self.ou, identity.organizational_units),
        ):
            for pattern in patterns:
                if pattern.matches(names):
                    return pattern
        return None


@dataclass(frozen=True)
class _CompiledMethodRule:
    rule: MethodRule
    callers: _Callers | None  # None: any caller

    def matches_caller(self, identity: PeerIdentity) -> bool:
        return self.callers is None or self.callers.match(identity) is not None

    def matches_method(self, method: str) -> bool:
        return any(_method_matches(pattern, method) for pattern in self.rule.methods)


def _method_matches(pattern: str, method: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        service = pattern[:-1]  # `/pkg.Service/`
        return method.startswith(service) and "/" not in method[len(service) :]
    return method == pattern


@dataclass(frozen=True)
class _CompiledRules:
    """The allow rules and their compiled patterns, and the CRLs, swapped as one."""

    rules: AllowRules
    revocations: Revocations | None  # the route's CRLs, if it has any
    callers: _Callers  # allow_cn/dns/uri/ou: these callers may call every method
    method_rules: tuple[_CompiledMethodRule, ...]

    @classmethod
    def of(cls, rules: AllowRules, revocations: Revocations | None) -> _CompiledRules:
        return cls(
            rules,
            revocations,
            _Callers.of(rules.cn, rules.dns, rules.uri, rules.ou),
            tuple(
                _CompiledMethodRule(
                    rule,
                    None if rule.any else _Callers.of(rule.cn, rule.dns, rule.uri, rule.ou, ""),
                )
                for rule in rules.rules
            ),
        )


class Policy:
    """Decides, for each call, whether the verified caller may invoke the method."""

    def __init__(self, rules: AllowRules, revocations: Revocations | None = None) -> None:
        self._compiled = _CompiledRules.of(rules, revocations)

    @property
    def rules(self) -> AllowRules:
        return self._compiled.rules

    def replace(self, rules: AllowRules) -> None:
        """Take new rules (a configuration reload): one assignment, so that a decision sees
        the old rules or the new, never a mix, and both planes see the swap at once."""
        self._compiled = _CompiledRules.of(rules, self._compiled.revocations)

    def replace_revocations(self, revocations: Revocations | None) -> None:
        """Take new CRLs (reloaded files), as replace takes rules."""
        self._compiled = _CompiledRules.of(self._compiled.rules, revocations)

    def admits(self, identity: PeerIdentity | None) -> bool:
        """Whether any call of this caller can be allowed: a caller admitted by no rule is
        refused on its whole connection (never reaching the upstream). The listener asks
        once per connection (and again for each open connection when the rules are
        replaced); per_call says whether its calls need deciding one by one."""
        compiled = self._compiled
        if identity is not None and _revoked(identity, compiled) is not None:
            return False
        if self._caller_rule(identity, compiled) is not None:
            return True
        if identity is None or identity.unreadable is not None:
            return False
        if compiled.rules.rules_mode == "audit":
            return True  # every call is let through (what would be denied, logged)
        return any(
            (rule.rule.action == "allow" or rule.rule.mode == "audit")
            and rule.matches_caller(identity)
            for rule in compiled.method_rules
        )

    def revoked(self, identity: PeerIdentity) -> str | None:
        """Why this caller's certificate is revoked (a CRL, deny_serials...), or None."""
        return _revoked(identity, self._compiled)

    def per_call(self, identity: PeerIdentity | None) -> bool:
        """Whether this admitted caller's calls must be decided one by one (some method
        rule may deny some of them, or in audit mode say so); False when it may call every
        method (allow_*)."""
        return self._caller_rule(identity, self._compiled) is None

    def decide(self, identity: PeerIdentity | None, method: str) -> Decision:
        """Allow, naming the rule that matched, or deny with the message the caller will see.
        With rules_mode audit, a denial by the rules is an allow that carries it (audit)."""
        decision = self._decide(identity, method)
        if (
            decision.allowed
            or self._compiled.rules.rules_mode != "audit"
            or identity is None
            or identity.unreadable is not None
            or _revoked(identity, self._compiled) is not None
        ):
            return decision
        return Decision(True, "rules_mode audit", audit=decision.reason)

    def _decide(self, identity: PeerIdentity | None, method: str) -> Decision:
        compiled = self._compiled
        revoked = _revoked(identity, compiled) if identity is not None else None
        if revoked is not None:
            return Decision(False, revoked, rule=REVOKED)
        rule = self._caller_rule(identity, compiled)
        if rule is not None:
            return Decision(True, rule)
        if identity is None:
            return Decision(
                False,
                f"peer without a client certificate may not call {escape(method)}",
                rule="no certificate",
            )
        denial = f"peer {identity.description} is not allowed to call {escape(method)}"
        if identity.unreadable is not None or not compiled.method_rules:
            return Decision(False, denial, rule="not allowed")
        for method_rule in compiled.method_rules:
            if method_rule.matches_method(method) and method_rule.matches_caller(identity):
                matched = method_rule.rule
                if matched.action == "allow":
                    return Decision(True, matched.title)
                denied = f"{denial} ({escape(matched.title)})"
                if matched.mode == "audit":  # a rule being tried out: said, not enforced
                    return Decision(True, f"{matched.title}, audit mode", audit=denied)
                return Decision(False, denied, rule=matched.title)
        return Decision(False, f"{denial} (no rule matched)", rule="no rule matched")

    def explain(self, identity: PeerIdentity, method: str) -> tuple[Decision, list[str]]:
        """The decision, and one line per step that led to it (`sidecar explain`): the
        revocation lists, the allow_* callers, then each rule tried, with why it did or did
        not match, up to the one that decided."""
        compiled = self._compiled
        decision = self.decide(identity, method)
        steps = []
        revoked = _revoked(identity, compiled)
        if revoked is not None:
            return decision, [f"revoked: {revoked}"]
        if compiled.revocations is not None:
            for crl in compiled.revocations.covering(identity.issuer, identity.authority_key_id):
                steps.append(f"crl {escape(crl.file)}: the certificate is not revoked")
        caller_rule = self._caller_rule(identity, compiled)
        listed = [f"{key} [{', '.join(patterns)}]" for key, patterns in compiled.rules.callers()]
        if caller_rule is not None:
            steps.append(f"{caller_rule}: the caller may call every method: ALLOWED")
            return decision, steps
        if listed:
            steps.append(f"{'; '.join(listed)}: no pattern matches the caller")
        for method_rule in compiled.method_rules:
            rule = method_rule.rule
            caller = (
                "any caller"
                if method_rule.callers is None
                else _matched(method_rule.callers.match(identity))
            )
            methods = ", ".join(rule.methods)
            method_matches = method_rule.matches_method(method)
            line = (
                f"{rule.where or rule.title} {rule.title if rule.name else ''}".rstrip()
                + f" ({rule.action}{', audit' if rule.mode == 'audit' else ''}): "
                f"caller {caller}; method {'matches' if method_matches else 'does not match'} "
                f"[{methods}]"
            )
            if method_matches and (method_rule.callers is None or caller.startswith("matches")):
                verdict = "ALLOWED"
                if rule.action == "deny":
                    verdict = "would deny (audit mode)" if rule.mode == "audit" else "DENIED"
                steps.append(f"{line}: {verdict} here")
                return decision, steps
            steps.append(line)
        if compiled.method_rules:
            steps.append("no rule matched: DENIED")
        return decision, steps

    @staticmethod
    def _caller_rule(identity: PeerIdentity | None, compiled: _CompiledRules) -> str | None:
        """The allow_* rule the caller matches (it may call every method), as the audit
        trail names it."""
        if compiled.rules.allow_all:
            return "allow-all"
        if identity is None or identity.unreadable is not None:
            return None  # a certificate that cannot be read matches nothing
        pattern = compiled.callers.match(identity)
        return f"{pattern.kind} {pattern.pattern}" if pattern is not None else None


def _revoked(identity: PeerIdentity, compiled: _CompiledRules) -> str | None:
    """Why the caller's certificate is refused whatever the rules say, or None."""
    rules = compiled.rules
    if identity.serial in rules.deny_serials:
        return (
            f"peer {identity.description}: certificate serial {identity.serial} is revoked "
            "(deny_serials)"
        )
    if identity.fingerprint in rules.deny_fingerprints:
        return (
            f"peer {identity.description}: certificate with SHA-256 fingerprint "
            f"{identity.fingerprint} is revoked (deny_fingerprints)"
        )
    if compiled.revocations is not None:
        refusal = compiled.revocations.refusal(
            identity.issuer, identity.authority_key_id, identity.serial
        )
        if refusal is not None:
            return f"peer {identity.description}: {refusal}"
    return None


def _matched(pattern: _Pattern | None) -> str:
    return "does not match" if pattern is None else f"matches ({pattern.kind} {pattern.pattern})"
