"""The privacy filter applied to every interaction before it is stored.

:func:`redact` (and :meth:`PrivacyFilter.redact`) replaces personal data and secrets in free text
with ``[REDACTED:<kind>]`` and reports the kinds found, never the values:

* personal data: ``email``, ``ipv4``, ``ipv6`` (in URLs, after ``user@``, with ports, compressed,
  with zone ids), ``phone`` (international, US and national forms with their trunk 0, and ten or
  eleven bare digits after a word such as "phone" or "call"), ``ssn``, ``card`` (Luhn-checked) and
  ``home_path`` (only the user name: ``/home/[REDACTED:user]/src``);
* secrets with a recognisable shape: ``aws_key``, ``gcp_key``, ``azure_key``, ``github_token``,
  ``gitlab_token``, ``slack_token``, ``openai_key``, ``stripe_key``, ``jwt``, ``private_key``
  (the whole PEM block) and ``url_password`` (``postgres://user:[REDACTED:url_password]@host``);
* secrets found by their name: ``password_assignment`` (any literal that is not a placeholder,
  assigned to a name ending in password/passwd/pwd/pass) and ``secret_assignment`` (a
  high-entropy literal assigned to a name ending in key/token/secret/credential/auth);
* detect-secrets' token rules for services with a distinctive prefix: ``sendgrid_key``,
  ``pypi_token``, ``mailchimp_key``, ``square_secret``, ``twilio_key``;
* chat and CI platforms: ``discord_token`` (bot tokens, their first part checked to be a numeric
  id; webhooks), ``telegram_token``, ``teams_webhook``, Slack app tokens (``slack_token``), GitLab's
  CI job, trigger, runner and deploy tokens (``gitlab_token``), ``npm_token``, ``docker_token``,
  ``circleci_token``, ``atlassian_token``;
* ``custom``: the operator's extra regexes (``privacy.exclude_sensitive_patterns``).

Policy calls worth knowing (each has a test):

* Addresses that identify nobody are kept: loopback, unspecified, multicast, reserved and
  link-local addresses (unless the interface id is a MAC address: ``fe80::21a:2bff:fe3c:4d5e``),
  net and host masks, the documentation ranges (``192.0.2.0/24``,
  ``2001:db8::/32``...), networks written as CIDR (``10.0.0.0/8``), public resolvers and dotted
  quads that read as versions or section numbers (three one-digit parts first: ``2.7.2.2``, or
  after ``==``, ``version``, ``section``). Other addresses, private ones included, are redacted.
* Assignments in code keep their expressions: ``password = os.environ["DB_PASSWORD"]``,
  ``token = request.headers[...]``, ``secret_key = settings.SECRET_KEY``, ``password = None``
  are left alone; only literals are redacted, and the quotes around them are kept. The name must
  end with the keyword: ``password_field = "x"`` and ``monkey = "..."`` are not secrets.
* Placeholders are kept: ``""``, ``"..."``, ``"xxx"``, ``"***"``, ``"<password>"``,
  ``"${DB_PASSWORD}"``, ``"{password}"``, ``"%(password)s"``, ``"your_password"``. A weak
  default such as ``"changeme"`` is a real password as far as a leak goes, so it is redacted.

Speed matters more than elegance here: every stored interaction passes through, ~5,000/s on two
cores. Every regex that scans a whole text starts with one literal character, the only case in
which ``re`` skips ahead in C at memchr-like speed (see "Why these regexes look odd" in
:mod:`app.privacy.tokens`); Luhn, ``ipaddress``, entropy and placeholder checks run in Python on the
rare matches. A 2 KB mix of prose and code costs about 20 µs, the whole standard library about 30 µs
per 2 KB (``python -m benchmarks.privacy``).

The package, one module per family of detectors (each appends candidates; the filter resolves them):

* :mod:`~app.privacy.filter`: :class:`PrivacyFilter`, :class:`Redaction` and :func:`redact`;
* :mod:`~app.privacy.candidates`: the kinds, candidate priorities, placeholder and entropy checks;
* :mod:`~app.privacy.tokens`: shaped tokens and private keys;
* :mod:`~app.privacy.addresses`: URL passwords, e-mail addresses, home directories;
* :mod:`~app.privacy.numbers`: IPv4, SSN, phone and card numbers (one digit-shape regex);
* :mod:`~app.privacy.ip`: which IP addresses identify someone, and IPv6;
* :mod:`~app.privacy.assignments`: ``password = "..."``, ``api_key: ...``, ``"token": "..."``.
"""

from __future__ import annotations

from app.privacy.candidates import KINDS
from app.privacy.filter import PrivacyFilter, Redaction, redact

__all__ = ["KINDS", "PrivacyFilter", "Redaction", "redact"]
