"""The privacy filter: every kind found, ordinary code left alone, values never recorded."""

from __future__ import annotations

import importlib
import inspect

import pytest

from app.privacy import PrivacyFilter, redact

POSITIVE = [
    ("email", "write to jane.doe+kaizen@mail.example.co.uk today", "jane.doe+kaizen@mail.example.co.uk"),
    ("ipv4", "the db is at 10.20.30.40:5432", "10.20.30.40"),
    ("ipv4", "public host 81.2.69.160", "81.2.69.160"),
    ("ipv4", "my interface is 10.1.2.3/24", "10.1.2.3"),
    ("ipv6", "listen on 2a00:1450:4001:82b::200e please", "2a00:1450:4001:82b::200e"),
    ("ipv6", "full 2a00:1450:4001:082b:0000:0000:0000:200e form", "2a00:1450:4001:082b:0000:0000:0000:200e"),
    ("phone", "call (415) 555-0134 now", "(415) 555-0134"),
    ("phone", "call 415-555-0134 now", "415-555-0134"),
    ("phone", "call +1 415 555 0134 now", "415 555 0134"),
    ("phone", "ring +44 20 7946 0958 from London", "+44 20 7946 0958"),
    ("phone", "or +49 30 123456 in Berlin", "+49 30 123456"),
    ("ssn", "SSN 123-45-6789 on file", "123-45-6789"),
    ("card", "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    ("card", "card 4111-1111-1111-1111", "4111-1111-1111-1111"),
    ("card", "card 5500000000000004", "5500000000000004"),
    ("card", "amex 378282246310005", "378282246310005"),
    ("aws_key", "aws_access_key_id=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("secret_assignment", 'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', "wJalrXUtnFEMI/K7MDENG"),
    ("gcp_key", "key=AIzaSyA-1234567890abcdefghijklmnopqrstu", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
    ("private_key", '{"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBg\\n-----END PRIVATE KEY-----\\n"}', "MIIEvQIBADANBg"),
    ("azure_key", "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFy==;EndpointSuffix=core.windows.net", "Zm9vYmFyYmF6cXV4"),
    ("github_token", "token ghp_abcdefghijklmnopqrstuvwxyz0123456789 here", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("github_token", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "github_pat_11ABCDEFG"),
    ("gitlab_token", "GITLAB=glpat-abcdefghij0123456789", "glpat-abcdefghij0123456789"),
    ("slack_token", "slack xoxb-1234567890-0987654321-abcdefghij", "xoxb-1234567890"),
    ("openai_key", "OPENAI sk-proj-abcdefghijklmnopqrstuvwxyz012345", "sk-proj-abcdefghijklmnopqrstuvwxyz012345"),
    ("stripe_key", "stripe.api_key = sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("jwt", "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "dozjgNryP4J3jVmNHl0w5N"),
    ("private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\nabc\n-----END RSA PRIVATE KEY-----", "MIIEpAIBAAKCAQEA7"),
    ("private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXk"),
    ("url_password", "DATABASE_URL=postgres://app:Hunter2Secret@db.internal:5432/app", "Hunter2Secret"),
    ("url_password", "redis://:s3cr3tpw@cache:6379/0", "s3cr3tpw"),
    ("password_assignment", 'password = "hunter2"', "hunter2"),
    ("password_assignment", "PASSWORD: correct-horse-battery", "correct-horse-battery"),
    ("password_assignment", '{"password": "s3cr3t!"}', "s3cr3t!"),
    ("password_assignment", "db_pass='abc123'", "abc123"),
    ("password_assignment", "DB_PASSWORD=hunter22\nOTHER=1", "hunter22"),
    ("secret_assignment", 'api_key = "a8f5f167f44f4964e6c998dee827110c"', "a8f5f167f44f4964e6c998dee827110c"),
    ("secret_assignment", 'self.token = "Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1"', "Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1"),
    ("secret_assignment", "  export API_TOKEN=Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1", "Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1"),
    ("secret_assignment", 'const clientSecret = "Q2x8nR5vT1yB7mK3pW9sD4fH"', "Q2x8nR5vT1yB7mK3pW9sD4fH"),
    ("home_path", "see /home/alice/project/main.py", "alice"),
    ("home_path", "at /Users/bob.smith/Library", "bob.smith"),
    ("home_path", r"in C:\Users\carol\AppData", "carol"),
    ("home_path", r'"C:\\Users\\dave\\code"', "dave"),
    ("sendgrid_key", "SG.abcdefghijklmnopqrstuv.abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "SG.abcdefghijklmnopqrstuv"),
]  # fmt: skip


@pytest.mark.parametrize("kind, text, secret", POSITIVE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(POSITIVE)])
def test_positive(kind: str, text: str, secret: str) -> None:
    result = redact(text)
    assert secret not in result.text, result.text
    assert kind in result.findings
    assert f"[REDACTED:{kind}]" in result.text
    assert secret not in repr(result)  # values are never kept, only kinds


NEGATIVE = [
    "x = 42; y = 3.14159; big = 1_000_000; n = 1234567",
    "requires torch==2.13.0 and numpy>=1.26.4; version v2.13.0.1 and 1.2.3",
    '__version__ = "0.5.1.2"',
    "commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904 (short 4b825dc)",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "id = '123e4567-e89b-12d3-a456-426614174000'",
    "released 2024-01-15, at 2024-01-15T10:30:00Z, meeting 12:30:45",
    "server.listen(8080); host = '127.0.0.1'; bind('0.0.0.0')",
    "private ranges 10.0.0.0/8, 172.16.0.0/12, fe80::/10; mask 255.255.255.0; multicast 224.0.0.1",
    "docs use 192.0.2.1, 198.51.100.7, 203.0.113.9 and 2001:db8::1 as examples",
    "password_field = 'id_password'",
    "def get_password(self): return self._password",
    "password = None",
    'password = os.environ["DB_PASSWORD"]',
    "password = getpass()",
    "self._pwd = pwd",
    'api_key = os.environ["API_KEY"]',
    "token = request.headers['Authorization']",
    "secret_key = settings.SECRET_KEY",
    'password = ""',
    'password = "${DB_PASSWORD}"',
    "password: <your-password>",
    'bypass = "abc12345"',
    'monkey = "Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1"',
    "items.sort(key=lambda item: item.name)",
    'd = {"key": "value", "token": "abc"}',
    "std::vector<int> v; auto x = std::move(v);",
    "a[1:2:3]; b[::2]; c = d[:, 1:]",
    "@property\ndef x(self): return self._x",
    "z = a @ b.T",
    "git clone git@github.com:org/repo.git",
    "random = 1234567812345678",
    "pi = 3.141592653589793",
    "timestamp_ns = 1700000000000000000",
]


@pytest.mark.parametrize("text", NEGATIVE)
def test_negative_ordinary_code_is_untouched(text: str) -> None:
    result = redact(text)
    assert result.text == text and result.findings == ()


@pytest.mark.parametrize("module", ["ipaddress", "textwrap", "json.decoder", "json.encoder", "difflib", "argparse", "functools",
                                    "collections", "dataclasses", "pathlib", "shlex", "zipfile", "tokenize"])
def test_standard_library_sources_come_back_unchanged(module: str) -> None:
    source = inspect.getsource(importlib.import_module(module))
    result = redact(source)
    # Author e-mail addresses in copyright headers are real personal data; nothing else may change.
    assert set(result.findings) <= {"email"}, result.counts


def test_findings_record_kinds_not_values() -> None:
    result = redact("mail a@example.com, key AKIAIOSFODNN7EXAMPLE, again b@example.com")
    assert result.findings == ("email", "aws_key", "email")
    assert result.counts == {"email": 2, "aws_key": 1}
    assert "AKIAIOSFODNN7EXAMPLE" not in repr(result) and "a@example.com" not in repr(result)


def test_redact_json_walks_nested_values_and_sensitive_keys() -> None:
    flt = PrivacyFilter(b"k")
    value = {"cmd": "ssh /home/alice/x", "env": {"DB_PASSWORD": "hunter2", "api_key": "abc", "token": ""},
             "args": ["--email", "x@example.org"], "count": 3, "password_field": "id_password"}
    clean, kinds = flt.redact_json(value)
    assert clean["cmd"] == "ssh /home/[REDACTED:home_path]/x"
    assert clean["env"] == {"DB_PASSWORD": "[REDACTED:password_assignment]",
                            "api_key": "[REDACTED:secret_assignment]", "token": ""}
    assert clean["args"] == ["--email", "[REDACTED:email]"] and clean["count"] == 3
    assert clean["password_field"] == "id_password"
    assert sorted(kinds) == ["email", "home_path", "password_assignment", "secret_assignment"]
    assert value["env"]["DB_PASSWORD"] == "hunter2"  # the input is not modified


def test_hash_id_is_keyed_and_stable() -> None:
    a, b = PrivacyFilter(b"key-a"), PrivacyFilter(b"key-b")
    assert a.hash_id("session-1") == a.hash_id("session-1") == PrivacyFilter(b"key-a").hash_id("session-1")
    assert a.hash_id("session-1") != b.hash_id("session-1")
    assert a.hash_id("session-1") != a.hash_id("session-2")
    assert len(a.hash_id("x")) == 32 and "key-a" not in repr(a)


def test_capture_rate_samples_sessions_deterministically() -> None:
    flt = PrivacyFilter(b"k", capture_rate=0.3)
    sessions = [f"session-{i}" for i in range(10_000)]
    taken = [flt.should_capture(s) for s in sessions]
    assert abs(sum(taken) / len(taken) - 0.3) < 0.03
    assert taken == [PrivacyFilter(b"k", capture_rate=0.3).should_capture(s) for s in sessions]
    assert all(PrivacyFilter(b"k", capture_rate=1.0).should_capture(s) for s in sessions[:100])
    assert not any(PrivacyFilter(b"k", capture_rate=0.0).should_capture(s) for s in sessions[:100])


def test_exclude_and_custom_patterns() -> None:
    flt = PrivacyFilter(b"k", extra_patterns=[r"ACME-\d{6}"], exclude_patterns=[r"(?i)top secret"])
    assert flt.excluded("fine", "this is TOP SECRET") and not flt.excluded("fine", None)
    result = flt.redact("ticket ACME-123456 is open")
    assert result.text == "ticket [REDACTED:custom] is open" and result.findings == ("custom",)
    with pytest.raises(ValueError, match="exclude pattern"):
        PrivacyFilter(b"k", exclude_patterns=["(unclosed"])
    with pytest.raises(ValueError, match="extra pattern"):
        PrivacyFilter(b"k", extra_patterns=["[z-a]"])


def test_many_findings_in_one_text_are_all_replaced() -> None:
    text = "\n".join(f"user{i}@example.com 10.0.0.{i + 1}" for i in range(50))
    result = redact(text)
    assert result.counts == {"email": 50, "ipv4": 50} and "@" not in result.text
