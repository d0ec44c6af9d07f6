"""The privacy filter: every kind found, ordinary code left alone, values never recorded."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from app.privacy import PrivacyFilter, Redaction, redact

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2\nq1w2e3r4t5y6u7i8o9p0\n"
    "-----END RSA PRIVATE KEY-----"
)

# (kind, text, the secret value that must disappear)
POSITIVE = [
    ("email", "write to jane.doe+kaizen@mail.example.co.uk today", "jane.doe+kaizen@mail.example.co.uk"),
    ("email", "alice@example.com opened the issue", "alice@example.com"),
    ("ipv4", "the db is at 10.20.30.40:5432", "10.20.30.40"),
    ("ipv4", "public host 81.2.69.160 answered", "81.2.69.160"),
    ("ipv4", "my interface is 172.16.5.4/24", "172.16.5.4"),
    ("ipv6", "listen on 2a00:1450:4001:82b::200e please", "2a00:1450:4001:82b::200e"),
    ("ipv6", "full 2a00:1450:4001:082b:0000:0000:0000:200e form", "2a00:1450:4001:082b:0000:0000:0000:200e"),
    ("ipv6", "proxy at [2a00:1450::8a2e:370]:8080", "2a00:1450::8a2e:370"),
    ("phone", "call (415) 555-0134 now", "(415) 555-0134"),
    ("phone", "call 555-123-4567 now", "555-123-4567"),
    ("phone", "call +1 555 123 4567 now", "555 123 4567"),
    ("phone", "ring +44 20 7946 0958 from London", "+44 20 7946 0958"),
    ("phone", "or +49 30 123456 in Berlin", "+49 30 123456"),
    ("phone", "toll-free 1-800-555-0199", "1-800-555-0199"),
    ("phone", "call me on 06 12 34 56 78 tonight", "06 12 34 56 78"),
    ("phone", "office 020 7946 0958 (London)", "020 7946 0958"),
    ("phone", "Berlin 030-1234567", "030-1234567"),
    ("phone", "dial 0044 20 7946 0958", "0044 20 7946 0958"),
    ("phone", "whatsapp +4915112345678", "+4915112345678"),
    ("phone", "phone: 4155550134", "4155550134"),
    ("phone", "my mobile is 07911123456", "07911123456"),
    ("phone", "Tel.: 0612345678", "0612345678"),
    ("ipv4", "ssh deploy@10.1.2.3 -p 22", "10.1.2.3"),
    ("ipv4", "git clone git@172.16.40.2:team/repo.git", "172.16.40.2"),
    ("ipv4", "curl http://81.2.69.160:8080/health", "81.2.69.160"),
    ("ipv6", "ssh admin@2a00:1450:4001:81b::200e", "2a00:1450:4001:81b::200e"),
    ("ipv6", "open http://[2a00:1450:4001:81b::200e]:8443/", "2a00:1450:4001:81b::200e"),
    ("ipv6", "neighbour fe80::21a:2bff:fe3c:4d5e%eth0 is up", "fe80::21a:2bff:fe3c:4d5e"),
    ("ipv6", "compressed 2a00:1450::200e", "2a00:1450::200e"),
    ("discord_token", "DISCORD_TOKEN=MTA4NjQ5NjAxMjM0NTY3ODkw.GxYzAb.abcdefghijklmnopqrstuvwxyz0123456789AB", "GxYzAb"),
    ("discord_token", "post https://discord.com/api/webhooks/123456789012345678/abcDEF-ghi_jkl", "abcDEF-ghi_jkl"),
    (
        "telegram_token",
        "bot = Bot('123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw1')",
        "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw1",
    ),
    (
        "teams_webhook",
        "https://contoso.webhook.office.com/webhookb2/abc-123@def/IncomingWebhook/x1/y2",
        "IncomingWebhook",
    ),
    ("slack_token", "SLACK_APP_TOKEN=xapp-1-A0123456789-1234567890123-" + "ab01" * 16, "A0123456789"),
    ("gitlab_token", "CI_JOB_TOKEN=glcbt-64_abcdefghijklmnopqrstu", "abcdefghijklmnopqrstu"),
    ("gitlab_token", "register --token glrt-t1_abcdefghijklmnopqrst", "abcdefghijklmnopqrst"),
    ("npm_token", "//registry.npmjs.org/:_authToken=npm_abcdefghijklmnopqrstuvwxyz0123456789", "npm_abcdefghij"),
    ("docker_token", "docker login -p dckr_pat_abcdefghijklmnopqrstuvwxyz1", "dckr_pat_abcdefghij"),
    ("circleci_token", "CIRCLE=CCIPAT_AbCdEfGhIjKlMnOpQrStUv_0123", "CCIPAT_AbCdEfGhIj"),
    ("atlassian_token", "JIRA_TOKEN ATATT3" + "xFfGF0" * 20, "ATATT3xFfGF0"),
    ("ssn", "SSN 123-45-6789 on file", "123-45-6789"),
    ("card", "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    ("card", "card 4111-1111-1111-1111", "4111-1111-1111-1111"),
    ("card", "card 5500000000000004", "5500000000000004"),
    ("card", "amex 3782 822463 10005", "3782 822463 10005"),
    ("aws_key", "aws_access_key_id=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("aws_key", "session ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A"),
    ("aws_key", 'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', "wJalrXUtnFEMI/K7MDENG"),
    ("gcp_key", "key=AIzaSyA-1234567890abcdefghijklmnopqrstu", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
    (
        "private_key",
        '{"type": "service_account", "private_key": '
        '"-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBg\\n-----END PRIVATE KEY-----\\n"}',
        "MIIEvQIBADANBg",
    ),
    ("private_key", PEM, "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2"),
    (
        "private_key",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nAAAEbm9uZQ (truncated)",
        "b3BlbnNzaC1rZXktdjEAAAAA",
    ),
    (
        "azure_key",
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFy==;EndpointSuffix=core.windows.net",
        "Zm9vYmFyYmF6cXV4",
    ),
    ("github_token", "token ghp_abcdefghijklmnopqrstuvwxyz0123456789 here", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("github_token", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "github_pat_11ABCDEFG"),
    ("gitlab_token", "GITLAB=glpat-abcdefghij0123456789", "glpat-abcdefghij0123456789"),
    ("slack_token", "slack xoxb-1234567890-0987654321-abcdefghij", "xoxb-1234567890"),
    ("openai_key", "OPENAI sk-proj-abcdefghijklmnopqrstuvwxyz012345", "sk-proj-abcdefghijklmnopqrstuvwxyz012345"),
    ("openai_key", "key: sk-abcdefghij1234567890ABCDEFGHIJ", "sk-abcdefghij1234567890ABCDEFGHIJ"),
    ("stripe_key", "stripe.api_key = sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    (
        "stripe_key",
        "rk_live_51HqLyjWDarjtT1zdp7dc and pk_test_TYooMQauvdEDq54NiTphI7jx",
        "rk_live_51HqLyjWDarjtT1zdp7dc",
    ),
    ("jwt", f"Authorization: Bearer {JWT}", "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"),
    ("url_password", "DATABASE_URL=postgres://app:Hunter2Secret@db.internal:5432/app", "Hunter2Secret"),
    ("url_password", "redis://:s3cr3tpw@cache:6379/0", "s3cr3tpw"),
    ("password_assignment", 'password = "hunter2"', "hunter2"),
    ("password_assignment", "PASSWORD: hunter2", "hunter2"),
    ("password_assignment", '{"password": "s3cr3t!"}', "s3cr3t!"),
    ("password_assignment", "db_pass='abc123'", "abc123"),
    ("password_assignment", "DB_PASSWORD=letmein\nOTHER=1", "letmein"),
    ("password_assignment", 'password = "changeme"', "changeme"),
    ("password_assignment", 'password: str = "Tr0ub4dor&3"', "Tr0ub4dor&3"),
    ("password_assignment", 'conn(user="u", passwd="q8#Lm2")', "q8#Lm2"),
    ("password_assignment", "mysqldump --password=Pa55word db", "Pa55word"),
    ("secret_assignment", 'api_key = "a8f5f167f44f4964e6c998dee827110c"', "a8f5f167f44f4964e6c998dee827110c"),
    ("secret_assignment", 'self.token = "Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1"', "Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1"),
    ("secret_assignment", "  export API_TOKEN=Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1", "Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1"),
    ("secret_assignment", 'const clientSecret = "Q2x8nR5vT1yB7mK3pW9sD4fH";', "Q2x8nR5vT1yB7mK3pW9sD4fH"),
    ("secret_assignment", "SECRET_KEY: 'django-insecure-7f$k2!x9q#m4z@1w8e5r6t'", "django-insecure-7f$k2!x9q"),
    ("secret_assignment", "GET /cb?access_token=Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1&state=1", "Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1"),
    ("home_path", "see /home/alice/project/main.py", "alice"),
    ("home_path", "at /Users/bob.smith/Library", "bob.smith"),
    ("home_path", r"in C:\Users\carol\AppData", "carol"),
    ("home_path", r'"C:\\Users\\dave\\code"', "dave"),
    (
        "sendgrid_key",
        "SG.abcdefghijklmnopqrstuv.abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
        "SG.abcdefghijklmnopqrstuv",
    ),
]


@pytest.mark.parametrize("kind, text, secret", POSITIVE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(POSITIVE)])
def test_each_kind_is_found_and_replaced(kind: str, text: str, secret: str) -> None:
    result = redact(text)
    assert secret not in result.text, result.text
    assert kind in result.findings, result.findings
    assert ("[REDACTED:user]" if kind == "home_path" else f"[REDACTED:{kind}]") in result.text
    assert secret not in repr(result)  # the kinds are recorded, never the values
    assert redact(result.text).findings == ()  # placeholders are not found again


@pytest.mark.parametrize(
    "text, expected",
    [
        ("see /home/alice/x", "see /home/[REDACTED:user]/x"),
        ("postgres://app:pw1@db:5432/x", "postgres://app:[REDACTED:url_password]@db:5432/x"),
        ('password = "hunter2"', 'password = "[REDACTED:password_assignment]"'),
        ("PASSWORD: hunter2", "PASSWORD: [REDACTED:password_assignment]"),
        ("AccountKey=Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4==;", "AccountKey=[REDACTED:azure_key];"),
        (f"x\n{PEM}\ny", "x\n[REDACTED:private_key]\ny"),
        ("mail a@example.com!", "mail [REDACTED:email]!"),
    ],
)
def test_only_the_value_is_replaced(text: str, expected: str) -> None:
    assert redact(text).text == expected


# Ordinary code and text, grouped by the kind each one could be mistaken for.
NEGATIVE = {
    "email": [
        "@property\ndef x(self): return self._x",
        "@functools.wraps(f)",
        "z = a @ b.T",
        "git clone git@github.com:org/repo.git",
        "user@localhost",
        "pip install pkg@1.2",
    ],
    "ipv4": [
        "requires torch==2.13.0 and numpy>=1.26.4; v2.13.0.1 and 1.2.3",
        "pip install pkg==2.13.0.1",
        '__version__ = "0.5.1.2"',
        "host = '127.0.0.1'; bind('0.0.0.0')",
        "mask 255.255.255.0",
        "private ranges 10.0.0.0/8, 172.16.0.0/12; multicast 224.0.0.1",
        "dns 8.8.8.8 and 1.1.1.1",
        "docs use 192.0.2.1, 198.51.100.7, 203.0.113.9",
        "see section 8.2.4.44",
        "1.3.6.1.4.1.311 is an OID",
        "999.1.1.1 is not an address",
    ],
    "ipv6": [
        "std::vector<int> v; auto x = std::move(v);",
        "Rust: Foo::bar::<u8>(); a::b",
        "a[1:2:3]; b[::2]; c = d[:, 1:]; e[1::2]; f[::-1]",
        "meeting at 12:30:45, 2024-01-15T10:30:00Z",
        "loopback ::1 and unspecified ::",
        "doc 2001:db8::1 and link-local fe80::1",
        "MAC 00:1A:2B:3C:4D:5E",
    ],
    "phone": [
        "x = y+12345678",
        "pi = +3.14159265",
        "offset = +0100",
        "2024-01-15 10:30",
        "range(1000, 2000, 3000)",
        "call 123-456-7890 (area code 123 does not exist)",
        "ts = 1700000000; n = 2147483647; x = 4155550134",
        "call_count = 4155550134; recall 4155550134",
        "date 01.02.2023 and 2023.01.02; v 0.10.12",
        "ids 0123 4567 and [0, 12, 34, 56] and 0 12 34 56 78",
        "the number is 4155550134",
    ],
    "chat_tokens": [
        "MyClassNameIsVeryLongIndeed.method.anotherVeryLongMethodNameHereToo",
        "Node.prototype.constructorName.toString",
        "time 12:34:56 and ratio 16:9; url http://host:8080/AA",
        "npm_config_cache = '/tmp/npm'; docker_pat = None",
    ],
    "ssn": [
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "123-00-4567",
        "2024-01-15",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
    ],
    "card": [
        "random = 1234567812345678",
        "4111111111111112",
        "timestamp_ns = 1700000000000000000",
        "ms = 1705314600000",
        "1 2 3 4 5 6 7 8 9 10 11 12 13",
        "n = 4111111111111111.5",
        "count: 1234567890123",
    ],
    "hashes": [
        "commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904 (short 4b825dc)",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "id = '123e4567-e89b-12d3-a456-426614174000'",
        "x = 42; y = 3.14159; big = 1_000_000; n = 1234567",
        "app.run(port=8080); localhost:5432",
    ],
    "tokens": [
        "the risk-adjusted-return-on-capital-basis",
        "ask-questions-early-and-often-please",
        "AKIA is a prefix",
        "JSONDecodeError('Expecting value', s, err.value)",
        "def ghost_writer(): pass",
        "mask_live_view = 1",
    ],
    "password_assignment": [
        "password_field = 'id_password'",
        "def get_password(self): return self._password",
        "password = None",
        'password = os.environ["DB_PASSWORD"]',
        "password = getpass()",
        "password = getpass.getpass('Password: ')",
        "self._pwd = pwd",
        "password = self.password",
        'password = ""',
        'password = "..."',
        'password = "<password>"',
        'password = "${DB_PASSWORD}"',
        'password = "xxx"',
        'password = "***"',
        "password: <your-password>",
        "def login(self, password: str) -> None:",
        'bypass = "abc12345"',
        "prompt = 'Enter password: '",
        'if password == "x":',
        "PASSWORD_MIN_LENGTH = 12",
        '{"password": password}',
        "password = f'{user}:{pw}'",
        "password: Optional[str] = None",
    ],
    "secret_assignment": [
        'api_key = os.environ["API_KEY"]',
        "token = request.headers['Authorization']",
        "secret_key = settings.SECRET_KEY",
        'monkey = "Zx9Qm2Lp7Vt4Rk8Ws3Yn6Bh1"',
        "items.sort(key=lambda item: item.name)",
        'd = {"key": "value", "token": "abc"}',
        "token_type = 'Bearer'",
        "tokens = tokenize(text)",
        "max_tokens=2048",
        'cache_key = f"user:{uid}"',
        "auth = base64.b64encode(user_passwd.encode()).decode('ascii')",
        "RegEnumKey = win32api.RegEnumKey",
        'api_key = "your-api-key-here"',
        'API_KEY = "<API_KEY>"',
    ],
    "home_path": [
        "https://example.com/home/index.html",
        "/srv/www/home/site",
        "/home/",
        "/Users/Shared/data",
        "~/project",
        "/home/[REDACTED:user]/x",
    ],
}


@pytest.mark.parametrize(
    "text",
    [t for texts in NEGATIVE.values() for t in texts],
    ids=[f"{k}-{i}" for k, ts in NEGATIVE.items() for i in range(len(ts))],
)
def test_ordinary_code_and_text_are_untouched(text: str) -> None:
    result = redact(text)
    assert result.findings == () and result.text == text, result.text


CLEAN_MODULES = [
    "json.decoder",
    "json.encoder",
    "ipaddress",
    "functools",
    "collections",
    "dataclasses",
    "pathlib",
    "shlex",
    "difflib",
    "statistics",
    "socket",
    "string",
    "configparser",
    "getpass",
    "http.client",
    "zipfile",
    "calendar",
    "typing",
    "ast",
]
# Modules whose headers name their authors with e-mail addresses: those are real personal data.
AUTHOR_MODULES = ["textwrap", "argparse", "tokenize", "inspect", "logging", "smtplib"]


# urllib.parse's comments show a link-local address whose interface id is a MAC address
# (fe80::822a:a8ff:fe49:470c): it identifies a machine, as the filter redacts it anywhere.
MAC_ADDRESS_MODULES = ["urllib.parse"]


@pytest.mark.parametrize("module", CLEAN_MODULES + AUTHOR_MODULES + MAC_ADDRESS_MODULES)
def test_standard_library_sources_come_back_unchanged(module: str) -> None:
    source = inspect.getsource(importlib.import_module(module))
    result = redact(source)
    if module in MAC_ADDRESS_MODULES:
        assert result.counts == {"ipv6": 1} and "fe49:470c" not in result.text, result.counts
    elif module in AUTHOR_MODULES:
        assert set(result.findings) == {"email"}, result.counts
        assert len(result.text.splitlines()) == len(source.splitlines())
    else:
        assert result.findings == () and result.text == source, result.counts


def test_findings_are_kinds_in_order_with_counts() -> None:
    result = redact("mail a@example.com, key AKIAIOSFODNN7EXAMPLE, again b@example.com from 10.20.30.40")
    assert result.findings == ("email", "aws_key", "email", "ipv4")
    assert result.counts == {"email": 2, "aws_key": 1, "ipv4": 1}
    assert "AKIAIOSFODNN7EXAMPLE" not in repr(result) and "a@example.com" not in repr(result)
    with pytest.raises(AttributeError):
        result.text = "x"  # type: ignore[misc]  # frozen
    assert redact("") == Redaction("", ()) and redact("nothing here").findings == ()


def test_overlaps_keep_the_most_specific_kind() -> None:
    # A token inside an assignment keeps its precise kind; the URL's host is not an e-mail.
    assert redact('password = "AKIAIOSFODNN7EXAMPLE"').findings == ("aws_key",)
    assert redact("postgres://app:pw1@db.example.com/x").findings == ("url_password",)
    assert redact(f'{{"private_key": "{PEM}"}}').findings == ("private_key",)


def test_many_findings_in_one_text_are_all_replaced() -> None:
    text = "\n".join(f"user{i}@example.com 10.0.0.{i + 1}" for i in range(50))
    result = redact(text)
    assert result.counts == {"email": 50, "ipv4": 50} and "@" not in result.text


def test_non_ascii_text_keeps_offsets() -> None:
    text = "Café “quote” — mail zoë.b@example.com, SSN 123-45-6789, pw: PASSWORD=h€ll0w0rld"
    result = redact(text)
    assert result.findings == ("email", "ssn", "password_assignment")
    assert result.text.startswith("Café “quote” — mail [REDACTED:email], SSN [REDACTED:ssn]")


def test_redact_json_walks_nested_values_and_sensitive_keys() -> None:
    flt = PrivacyFilter(b"k")
    value = {
        "cmd": "ssh /home/alice/x",
        "env": {"DB_PASSWORD": "hunter2", "api_key": "abc", "token": "", "secret": "${SECRET}"},
        "args": ["--email", "x@example.org"],
        "headers": {"Authorization": "Bearer abc.def"},
        "count": 3,
        "password_field": "id_password",
        "key": "user_id",
        "usage": {"max_tokens": "512"},
        "bob@example.com": True,
    }
    clean, kinds = flt.redact_json(value)
    assert clean["cmd"] == "ssh /home/[REDACTED:user]/x"
    assert clean["env"] == {
        "DB_PASSWORD": "[REDACTED:password_assignment]",
        "api_key": "[REDACTED:secret_assignment]",
        "token": "",
        "secret": "${SECRET}",
    }
    assert clean["args"] == ["--email", "[REDACTED:email]"] and clean["count"] == 3
    assert clean["headers"] == {"Authorization": "[REDACTED:secret_assignment]"}
    assert clean["password_field"] == "id_password" and clean["key"] == "user_id"
    assert clean["usage"] == {"max_tokens": "512"} and clean["[REDACTED:email]"] is True
    assert sorted(kinds) == [
        "email",
        "email",
        "home_path",
        "password_assignment",
        "secret_assignment",
        "secret_assignment",
    ]
    assert value["env"]["DB_PASSWORD"] == "hunter2"  # the input is not modified
    assert flt.redact_json(["a", 1, None, 2.5]) == (["a", 1, None, 2.5], [])


def test_hash_id_is_keyed_and_stable() -> None:
    a, b = PrivacyFilter(b"key-a"), PrivacyFilter(b"key-b")
    assert a.hash_id("session-1") == a.hash_id("session-1") == PrivacyFilter(b"key-a").hash_id("session-1")
    assert a.hash_id("session-1") != b.hash_id("session-1")
    assert a.hash_id("session-1") != a.hash_id("session-2")
    assert re.fullmatch(r"[0-9a-f]{32}", a.hash_id("x"))
    assert "key-a" not in repr(a) and all("key-a" not in repr(v) for v in vars(a).values() if not isinstance(v, bytes))


def test_should_capture_samples_sessions_deterministically() -> None:
    flt = PrivacyFilter(b"k", capture_rate=0.3)
    sessions = [f"session-{i}" for i in range(10_000)]
    taken = [flt.should_capture(s) for s in sessions]
    assert abs(sum(taken) / len(taken) - 0.3) < 0.03
    # The same answer from another instance, and from another key (sampling is not a secret).
    assert taken == [PrivacyFilter(b"other", capture_rate=0.3).should_capture(s) for s in sessions]
    assert all(PrivacyFilter(b"k", capture_rate=1.0).should_capture(s) for s in sessions[:200])
    assert not any(PrivacyFilter(b"k", capture_rate=0.0).should_capture(s) for s in sessions[:200])
    with pytest.raises(ValueError, match="capture_rate"):
        PrivacyFilter(b"k", capture_rate=1.5)


def test_exclude_and_custom_patterns() -> None:
    flt = PrivacyFilter(
        b"k", extra_patterns=[r"ACME-\d{6}", r"x*"], exclude_patterns=[r"(?i)top secret", r"DO-NOT-STORE"]
    )
    assert flt.excluded("fine", "this is TOP SECRET") and flt.excluded("DO-NOT-STORE")
    assert not flt.excluded("fine", None, "")
    assert not PrivacyFilter(b"k").excluded("anything")
    result = flt.redact("ticket ACME-123456 is open")  # the empty matches of x* are ignored
    assert result.text == "ticket [REDACTED:custom] is open" and result.findings == ("custom",)
    with pytest.raises(ValueError, match=re.escape("'(unclosed'")):
        PrivacyFilter(b"k", exclude_patterns=["(unclosed"])
    with pytest.raises(ValueError, match=re.escape("'[z-a]'")):
        PrivacyFilter(b"k", extra_patterns=["[z-a]"])


@pytest.mark.parametrize(
    "text",
    [
        "private ranges 10.0.0.0/8, 172.16.0.0/12, fe80::/10; mask 255.255.255.0; multicast 224.0.0.1",
        "docs use 192.0.2.1, 198.51.100.7, 203.0.113.9 and 2001:db8::1 as examples",
        "ssh admin@192.0.2.10 -p 2222 and [2001:db8::1]:8080 in the docs",
        "link-local fe80::1%eth0 and fe80::a1b2:c3d4%en0 name no machine",
        "y = x@self.weight + b; z = h@this.proj",
    ],
)
def test_ranges_masks_examples_and_matmul_are_kept(text: str) -> None:
    assert redact(text).findings == ()


@pytest.mark.parametrize(
    "text, secret, kind",
    [
        ("my interface is 10.1.2.3/24", "10.1.2.3", "ipv4"),
        ("public host 81.2.69.160", "81.2.69.160", "ipv4"),
        ("listen on 2a00:1450:4001:82b::200e please", "2a00:1450:4001:82b::200e", "ipv6"),
    ],
)
def test_host_addresses_are_redacted(text: str, secret: str, kind: str) -> None:
    result = redact(text)
    assert secret not in result.text and result.findings == (kind,)
