"""Personal data written as digits: IPv4 addresses, US social security numbers, phone numbers
(international, US and national forms with their trunk 0, and ten or eleven digits without
separators after a word such as "phone" or "call") and payment card numbers, all found by one
regex.

A new number shape is a named branch of ``_NUMBER_SRC`` and a case of :func:`scan_numbers`.
"""

from __future__ import annotations

import re

from app.privacy.candidates import P_PII, Candidate
from app.privacy.ip import ipv4_kept

__all__ = ["scan_numbers"]

# --- numbers: IPv4, SSN, phone, payment card ----------------------------------------------------

# Digits are not one character, so a regex that starts with ``\d`` tests every position (15 µs
# per 2 KB). Instead every digit of the ASCII view is mapped to "\x01" (``bytes.translate``, a C
# table lookup) and one regex anchored on that literal finds all number shapes; each branch is a named group so
# that the Python side knows which shape matched. The lookbehind right after the first digit
# rejects digits inside words, versions, decimals and longer numbers.
_NUMBER_SRC = r"""
    \x01(?<![\w\x01.\-]\x01)
    (?=[\x01() .\-]{6})   # every shape goes on for 6 more digits or separators: a quick no
    (?:
        (?P<intl>(?<=\+\x01)\x01{0,2}(?:[ .\-]?\(?\x01{1,5}\)?){1,6}+)     # +44 20 7946 0958
      | (?P<ipv4>\x01{0,2}(?:\.\x01{1,3}){3})                              # 10.20.30.40
      | (?P<ssn>\x01\x01-\x01\x01-\x01{4})                                 # 123-45-6789
      | (?P<us>\x01\x01(?P<s1>[-. ])\x01{3}(?P=s1)\x01{4})                 # 555-123-4567
      | (?P<us1>(?P<s2>[-. ])\x01{3}(?P=s2)\x01{3}(?P=s2)\x01{4})          # 1-800-555-0199
      | (?P<paren>(?<=\(\x01)\x01\x01\)\ ?\x01{3}[-.\ ]\x01{4})             # (555) 123-4567
      | (?P<card>\x01{3}(?:[\ \-]?\x01{4}){2}[\ \-]?\x01{1,7}               # 13-19 digits by 4
                |\x01{3}[\ \-]?\x01{6}[\ \-]?\x01{5})                        # 4-6-5 (Amex)
      | (?P<national>\x01{1,4}(?P<s3>[\ \-./])\x01{2,8}(?:(?P=s3)\x01{2,8}){0,3})  # 020 7946 0958
      | (?P<bare>\x01{9,10})                                               # 4155550134
    )
    (?![\w\x01@]|[.\-]\x01)
"""
_NUMBER_RE = re.compile(_NUMBER_SRC.encode(), re.VERBOSE)
_DIGITS = bytes.maketrans(b"0123456789", b"\x01" * 10)
_SSN_RE = re.compile(r"(?!000|666|9)\d{3}-(?!00)\d\d-(?!0000)\d{4}")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_number(digits: str) -> bool:
    """A Luhn-valid number of a length and prefix that a card network issues (so that 13-digit
    millisecond timestamps and other long constants that happen to pass Luhn are left alone)."""
    n, d2 = len(digits), digits[:2]
    if digits[0] == "4":
        ok = n in (13, 16, 19)
    elif d2 in ("34", "37"):
        ok = n == 15
    elif d2 in ("30", "36", "38", "39"):
        ok = 14 <= n <= 19
    elif "51" <= d2 <= "55" or "2221" <= digits[:4] <= "2720":
        ok = n == 16
    elif digits[0] in "56":
        ok = 16 <= n <= 19
    else:
        ok = d2 == "35" and 16 <= n <= 19
    return ok and _luhn(digits)


# Words that say a run of digits without separators is a phone number (4155550134 alone could be
# any ten-digit constant).
_PHONE_CONTEXT_RE = re.compile(
    r"(?i)\b(?:phone|tel|telephone|mobile|cell|call|fax|sms|whatsapp|signal|contact|reach\s+me\s+at|ring)"
    r"[a-z]*\.?(?:[\s:#=\"'(]|\b(?:is|at|on|me|no|nr|number)\b\.?)*\Z"
)


def _national_phone(value: str) -> bool:
    """A number in a national form with its trunk prefix (``020 7946 0958``, ``06 12 34 56 78``,
    ``030-1234567``), or one dialled with an international prefix (``0044 20 7946 0958``): it starts
    with 0, its groups share one separator, and it has 9 to 12 digits (13 to 17 after 00)."""
    digits = sum(c.isdigit() for c in value)
    if value.startswith("00"):
        return 12 <= digits <= 17
    return value[0] == "0" and 9 <= digits <= 12


def _bare_phone(text: str, start: int, value: str) -> bool:
    """Ten digits (a North American number, its area code not starting with 0 or 1), eleven with
    its leading 1, or a national number with its trunk 0 (10 or 11 digits), written without
    separators, after a word that says it is a phone number."""
    if value[0] == "0":
        shaped = value[1] != "0"
    else:
        shaped = (len(value) == 10 and value[0] not in "01") or (
            len(value) == 11 and value[0] == "1" and value[1] not in "01"
        )
    return shaped and _PHONE_CONTEXT_RE.search(text, max(0, start - 32), start) is not None


def scan_numbers(text: str, ascii_view: bytes, out: list[Candidate]) -> None:
    """Append the IPv4 addresses, SSNs, card and phone numbers found in ``text`` to ``out``."""
    for m in _NUMBER_RE.finditer(ascii_view.translate(_DIGITS)):
        shape = m.lastgroup
        start, end = m.span()
        value = text[start:end]
        if shape == "ipv4":
            if not ipv4_kept(text, start, end):
                out.append((start, end, P_PII, "ipv4"))
        elif shape == "ssn":
            if _SSN_RE.fullmatch(value):
                out.append((start, end, P_PII, "ssn"))
        elif shape == "card":
            digits = value.replace(" ", "").replace("-", "")
            if 13 <= len(digits) <= 19 and _card_number(digits):
                out.append((start, end, P_PII, "card"))
        elif shape == "intl":
            if start > 1 and (text[start - 2].isalnum() or text[start - 2] in ")]_"):
                continue  # x+12345678: arithmetic
            digits = sum(c.isdigit() for c in value)
            if not 8 <= digits <= 15 or value.count(".") == 1 or value.count("(") != value.count(")"):
                continue  # too short or long for E.164, or a signed decimal (+1.23456789)
            if digits == len(value) and digits < 10:
                continue  # +12345678 with no separators reads as a signed number
            out.append((start - 1, end, P_PII, "phone"))
        elif shape == "national":
            if _national_phone(value):
                out.append((start, end, P_PII, "phone"))
        elif shape == "bare":
            if _bare_phone(text, start, value):
                out.append((start, end, P_PII, "phone"))
        else:  # a US number: the area code cannot start with 0 or 1
            digits = [c for c in value if c.isdigit()]
            if shape == "paren":
                start -= 1
            if digits[-10] not in "01" and (len(digits) == 10 or digits[0] == "1"):
                out.append((start, end, P_PII, "phone"))
