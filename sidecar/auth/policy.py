"""Who may call: the allowlist, decided per call as a pure function of (identity, method).

Rules are OR'd: a caller is allowed when any of its names matches any rule of the
matching kind (`allow_cn` against the subject CN, `allow_dns` against DNS SANs,
`allow_uri` against URI SANs, SPIFFE IDs included). Patterns are exact names or
globs: `*` matches within one label (no `.` for CN and DNS, no `/` for URIs),
`**` matches across labels. DNS names compare case-insensitively (RFC 4343),
folding ASCII letters only; CNs and URIs compare exactly. No I/O here: the
policy is easy to test exhaustively and to swap atomically.

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
from sidecar.observe.logs import escape


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


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # For a denial, the message the caller receives (printable ASCII: caller-controlled
    # text in it is escaped, so it can go into a log line as it is); for an allow, the rule.
    reason: str


@dataclass(frozen=True)
class _Rule:
    kind: str  # the flag that declared it, for the audit trail
    pattern: str
    regex: re.Pattern[str] = field(compare=False)

    def matches(self, names: tuple[str, ...]) -> bool:
        return any(self.regex.fullmatch(name) for name in names if matchable(name))


@dataclass(frozen=True)
class _CompiledRules:
    """The allow rules and their compiled patterns, swapped as one."""

    rules: AllowRules
    cn: tuple[_Rule, ...]
    dns: tuple[_Rule, ...]
    uri: tuple[_Rule, ...]

    @classmethod
    def of(cls, rules: AllowRules) -> _CompiledRules:
        return cls(
            rules,
            tuple(_Rule("allow-cn", p, compile_pattern(p, ".")) for p in rules.cn),
            tuple(
                _Rule("allow-dns", p, compile_pattern(p, ".", ignore_case=True)) for p in rules.dns
            ),
            tuple(_Rule("allow-uri", p, compile_pattern(p, "/")) for p in rules.uri),
        )


class Policy:
    """Decides, for each call, whether the verified caller may invoke the method."""

    def __init__(self, rules: AllowRules) -> None:
        self._compiled = _CompiledRules.of(rules)

    @property
    def rules(self) -> AllowRules:
        return self._compiled.rules

    def replace(self, rules: AllowRules) -> None:
        """Take new rules (a configuration reload): one assignment, so that a decision sees
        the old rules or the new, never a mix, and both planes see the swap at once."""
        self._compiled = _CompiledRules.of(rules)

    def admits(self, identity: PeerIdentity | None) -> bool:
        """Whether any call of this caller can be allowed: a caller admitted by no rule is
        refused on its whole connection (never reaching the upstream). Every rule today
        names callers only, so for an admitted caller every call is allowed as well, and
        the listener decides once per connection (and again for each open connection when
        the rules are replaced); rules that name methods will make the splice decide per
        call too."""
        return self._matching_rule(identity) is not None

    def decide(self, identity: PeerIdentity | None, method: str) -> Decision:
        """Allow, naming the rule that matched, or deny with the message the caller will see."""
        rule = self._matching_rule(identity)
        if rule is not None:
            return Decision(True, rule)
        if identity is None:
            return Decision(
                False, f"peer without a client certificate may not call {escape(method)}"
            )
        return Decision(
            False, f"peer {identity.description} is not allowed to call {escape(method)}"
        )

    def _matching_rule(self, identity: PeerIdentity | None) -> str | None:
        """The first rule the caller matches, as the audit trail names it."""
        compiled = self._compiled
        if compiled.rules.allow_all:
            return "allow-all"
        if identity is None or identity.unreadable is not None:
            return None  # a certificate that cannot be read matches nothing
        common_names = (identity.common_name,) if identity.common_name is not None else ()
        for rules, names in (
            (compiled.cn, common_names),
            (compiled.dns, identity.dns_names),
            (compiled.uri, identity.uris),
        ):
            for rule in rules:
                if rule.matches(names):
                    return f"{rule.kind} {rule.pattern}"
        return None
