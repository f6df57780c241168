"""`sidecar explain`: the decision for a caller and a method, the rule that decides and why
each earlier one did not; exit 0 allowed, 1 denied, 2 usage or configuration error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import Pki, SidecarFactory

RULES = [
    {"name": "billing-reads", "action": "allow", "cn": ["billing"],
     "methods": ["/kv.KV/Get", "/kv.KV/List"]},
    {"name": "trial", "action": "deny", "ou": ["contractors"], "methods": ["/kv.KV/Get"],
     "mode": "audit"},
    {"action": "deny", "any": True, "methods": ["/kv.KV/*"]},
    {"action": "allow", "cn": ["billing"], "methods": ["*"]},
]  # fmt: skip


@pytest.fixture
def config(tmp_path: Path, pki: Pki) -> Path:
    path = tmp_path / "sidecar.yaml"
    route = {
        "name": "kv", "upstream": "127.0.0.1:50051", "listen": "127.0.0.1:0",
        "cert": "not-read.pem", "key": "not-read.key", "ca": "not-read-ca.pem",
        "allow_cn": ["admin"], "rules": RULES,
    }  # fmt: skip
    path.write_text(yaml.safe_dump({"routes": [route]}))
    return path


@pytest.mark.parametrize(
    ("caller", "method", "code", "lines"),
    [
        (["--cn", "billing"], "/kv.KV/Get", 0, [
            "allow_cn [admin]: no pattern matches the caller",
            "rules[0] rule 'billing-reads' (allow): caller matches (cn billing); method matches "
            "[/kv.KV/Get, /kv.KV/List]: ALLOWED here",
            "allowed: rule 'billing-reads'",
        ]),
        (["--cn", "billing"], "/kv.KV/Put", 1, [
            "rules[0] rule 'billing-reads' (allow): caller matches (cn billing); method does "
            "not match [/kv.KV/Get, /kv.KV/List]",
            "rules[1] rule 'trial' (deny, audit): caller does not match",
            "rules[2] (deny): caller any caller; method matches [/kv.KV/*]: DENIED here",
            "denied: peer CN=billing is not allowed to call /kv.KV/Put (rule routes[0].rules[2])",
        ]),
        (["--cn", "billing"], "/other.S/Call", 0, ["rules[3] (allow)", "ALLOWED here"]),
        (["--cn", "admin"], "/kv.KV/Delete", 0, [
            "allow-cn admin: the caller may call every method: ALLOWED",
        ]),
        (["--cn", "eve", "--ou", "contractors"], "/kv.KV/Get", 0, [
            "rules[1] rule 'trial' (deny, audit): caller matches (ou contractors)",
            "(audit mode would deny: peer CN=eve is not allowed to call /kv.KV/Get",
        ]),
        (["--cn", "eve"], "/other.S/Call", 1, ["no rule matched: DENIED",
                                               "(no rule matched)"]),
    ],
)  # fmt: skip
def test_explain_says_the_decision_and_why(
    sidecars: SidecarFactory, config: Path, caller: list[str], method: str, code: int,
    lines: list[str],
) -> None:  # fmt: skip
    result = sidecars.run("explain", "--config", str(config), "--route", "kv",
                          "--method", method, *caller)  # fmt: skip
    assert result.returncode == code, result.stdout + result.stderr
    for line in lines:
        assert line in result.stdout, result.stdout


def test_explain_reads_the_caller_from_a_certificate(
    sidecars: SidecarFactory, config: Path, pki: Pki
) -> None:
    result = sidecars.run("explain", "--config", str(config), "--cert", str(pki.cert("carol")),
                          "--method", "/kv.KV/Get")  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "/kv.KV/Get by CN=carol, DNS=carol.svc.example.org" in result.stdout
    assert "DENIED here" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--method", "/kv.KV/Get", "--cn", "a", "--route", "nope"],
         "--route: no ingress route named 'nope' (named: 'kv')"),
        (["--method", "/kv.KV/Get"], "give the caller: --cert FILE, or --cn/--dns/--uri/--ou"),
        (["--cn", "a"], "usage error: the following arguments are required: --method"),
        (["--method", "/kv.KV/Get", "--cert", "/nonexistent.pem"], "--cert: no such file"),
    ],
)  # fmt: skip
def test_explain_usage_errors_exit_2_with_one_line(
    sidecars: SidecarFactory, config: Path, args: list[str], expected: str
) -> None:
    result = sidecars.run("explain", "--config", str(config), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
