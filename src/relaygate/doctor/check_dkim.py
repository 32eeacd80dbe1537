"""The DKIM check: for each selector the relay signs with, the published key record is there,
alone, usable (tags, key type and size, h= and s= restrictions) and the relay's own key.

One module per check family; ``diagnose`` runs it beside the SPF check.
"""

from __future__ import annotations

import base64
import re

import dns.asyncresolver
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from .check_dmarc import _DMARC_REJECT
from .dns_records import _txt, parse_tags, zone_txt
from .report import Report, _State

_DKIM_KEY_TAGS = ("v", "h", "k", "n", "p", "s", "t")
_DKIM_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_WHITESPACE = re.compile(r"\s+")


def dkim_key_tags(record: str) -> dict[str, str] | None:
    """A DKIM key record's tags as verifiers read them (None if malformed or a tag repeats).

    RFC 6376 §3.2: tag names are case-sensitive ("K=" is not "k=", an unknown tag verifiers
    ignore, §3.6.1) and so are values unless a tag says otherwise; whitespace around values is
    not part of them, and p= is base64 in which whitespace (folding, the joints of TXT strings)
    is ignored. So dkimpy reads it, and so receivers verify the relay's signatures.
    """
    tags: dict[str, str] = {}
    for part in record.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not _DKIM_TAG_NAME.fullmatch(name) or name in tags:
            return None
        tags[name] = _WHITESPACE.sub("", value) if name == "p" else value.strip()
    return tags


def _miscased_tags(tags: dict[str, str]) -> str:
    """A note on tags written in capitals that verifiers take for unknown ones ("K=", "P=")."""
    miscased = [t for t in tags if t.lower() in _DKIM_KEY_TAGS and t not in _DKIM_KEY_TAGS]
    if not miscased:
        return ""
    spelled = ", ".join(f"{t}= is not {t.lower()}=" for t in miscased)
    return f"; tag names are case-sensitive (RFC 6376 §3.2): {spelled}"


def _local_public(local: str) -> tuple[str | None, str]:
    """``(k, p)`` of the relay's key given as a record value or as the bare ``p=`` base64."""
    if "p=" in local:
        tags = parse_tags(local) or {}
        return tags.get("k", "rsa").lower(), tags.get("p", "")
    return None, re.sub(r"\s+", "", local)


async def _check_dkim(
    report: Report,
    resolver: dns.asyncresolver.Resolver,
    state: _State,
    keys: list[tuple[str, str | None]],
) -> None:
    """The published key of each (selector, the relay's public record) the relay signs with.
    Every enabled key of the signing domain signs (a rotation, RSA beside Ed25519), so each
    has its own findings; DKIM aligns for DMARC if one of them verifies."""
    domain = state.signing_domain or report.domain  # the key receivers fetch is d='s
    if not keys:
        report.add(
            "DKIM",
            "warning",
            f"relayed mail from {domain} is not DKIM-signed: no selector configured",
            "Without a signature DMARC relies on SPF alone, and Gmail/Outlook.com junk or refuse "
            "unauthenticated mail (550 5.7.26).",
            f"relaygate dkim new --domain {domain} --selector s1; add the [[dkim]] entry it "
            "prints, publish the TXT record, then run the doctor with --selector s1",
        )
        return
    for selector, local_public in keys:  # in order: each selector's findings together
        await _check_selector(report, resolver, state, domain, selector, local_public)
    if state.dkim_ed25519_ok and not state.dkim_ok:
        report.add(
            "DKIM",
            "warning",
            f"{domain} is DKIM-signed with Ed25519 only: Gmail, Microsoft 365 and Yahoo do not "
            "verify ed25519-sha256 signatures (dkim=neutral or fail there), so DMARC cannot "
            "pass on DKIM at those receivers",
            "RFC 8463 signs with Ed25519 beside RSA, not in its place.",
            f"relaygate dkim new --domain {domain} --selector SELECTOR (rsa-sha256): add its "
            "[[dkim]] entry beside the Ed25519 one and publish its TXT record; both sign",
        )


async def _check_selector(
    report: Report,
    resolver: dns.asyncresolver.Resolver,
    state: _State,
    domain: str,
    selector: str,
    local_public: str | None,
) -> None:
    name = f"{selector}._domainkey.{domain}"
    publish = zone_txt(name, local_public) if local_public and "p=" in local_public else ""
    publish_fix = (
        f"Publish: {publish}"
        if publish
        else f"Publish the record `relaygate dkim show` prints for {name}"
    )
    txt = await _txt(resolver, name)
    if txt.failed:
        report.add(
            "DKIM",
            "error",
            f"DKIM key lookup for {name} failed ({txt.reply}): receivers report dkim=temperror",
            txt.error,
            f"Fix the name servers for {domain}: `dig {name} TXT` must answer.",
        )
        return
    records = [r for r in txt.records if _is_dkim_record(r)] if txt.status == "ok" else []
    if not records:
        report.add(
            "DKIM",
            "error",
            f"no DKIM record at {name}: receivers report dkim=permerror (no key for signature), "
            f"so DMARC cannot pass on DKIM ({_DMARC_REJECT} under p=reject)",
            "Signed mail carries s="
            + selector
            + "; receivers fetch the public key from this name.",
            publish_fix,
        )
        return
    if len(txt.records) > 1:
        # RFC 6376 §3.6.2.2: several TXT records at the name give undefined results; another
        # text there is no less a candidate than a second key (dkimpy takes the first one)
        kind = "DKIM" if len(records) == len(txt.records) else "TXT"
        report.add(
            "DKIM",
            "error",
            f"{len(txt.records)} {kind} records at {name}: receivers may pick either and fail the "
            "signature",
            " | ".join(txt.records),
            f"Keep only one record at {name}" + (f": {publish}" if publish else "."),
        )
        return
    tags = dkim_key_tags(records[0])
    problem = ""
    key_type = ""
    if tags is None:
        problem = "the record is not a valid tag=value list"
    elif tags.get("v", "DKIM1") != "DKIM1":
        problem = f"v={tags['v']} (must be DKIM1)"
    else:
        key_type = tags.get("k", "rsa")
        p = tags.get("p", "")
        if "p" not in tags:
            problem = "no p= tag: the record holds no key"
        elif not p:
            problem = "p= is empty: the key is revoked"
        elif key_type.lower() in ("rsa", "ed25519") and key_type not in ("rsa", "ed25519"):
            problem = (
                f"k={key_type}: verifiers compare the key type as written (k={key_type.lower()})"
            )
        elif key_type not in ("rsa", "ed25519"):
            problem = f"unknown key type k={key_type}"
        else:
            try:
                raw = base64.b64decode(p, validate=True)
            except ValueError:
                problem = "p= is not valid base64"
            else:
                problem = _key_problem(key_type, raw) or _usage_problem(tags)
        problem += _miscased_tags(tags) if problem else ""
    if problem:
        report.add(
            "DKIM",
            "error",
            f"DKIM record at {name} is unusable ({problem}): receivers report dkim=permerror",
            f"Record: {records[0]}",
            publish_fix,
        )
        return
    assert tags is not None
    if local_public:
        local_k, local_p = _local_public(local_public)
        if local_p != tags["p"] or (local_k and local_k != key_type):
            report.add(
                "DKIM",
                "error",
                f"DKIM key mismatch at {name}: the published key is not the relay's key, so "
                f"receivers report dkim=fail (signature did not verify) and DMARC fails "
                f"({_DMARC_REJECT} under p=reject)",
                f"Published: {records[0][:80]}... The relay signs with a different key (rotated "
                "key not yet published, or the record was copied from another selector).",
                publish_fix,
            )
            return
        if key_type == "ed25519":
            state.dkim_ed25519_ok = True
        else:
            state.dkim_ok = True
        report.add(
            "DKIM",
            "ok",
            f"DKIM record at {name} matches the relay's {key_type} key",
            "testing mode (t=y): some receivers ignore failures"
            if "y" in tags.get("t", "")
            else "",
        )
        return
    report.add(
        "DKIM",
        "info",
        f"DKIM record at {name} is valid ({key_type}); no local key to compare it with",
        "The relay has no key for this domain and selector, so it does not sign with it.",
        "relaygate dkim show (or --config) to compare with the relay's key",
    )


_DKIM_VERSION = re.compile(r"\s*v\s*=\s*DKIM1\s*(?:;|$)", re.IGNORECASE)


def _is_dkim_record(text: str) -> bool:
    """A key record: it starts with v=DKIM1 or carries a p= tag (v= is optional, RFC 6376 §3.6.1)."""
    return "p=" in text or _DKIM_VERSION.match(text) is not None


def _usage_problem(tags: dict[str, str]) -> str:
    """A restriction in the key record that makes receivers refuse the relay's signatures.

    RFC 6376 §3.6.1: h= lists the hashes the key may be used with (the relay signs rsa-sha256 and
    ed25519-sha256) and s= the services (``email`` or ``*``); a signature outside either fails
    verification (§6.1.2) however well the key matches.
    """
    hashes = [h.strip().lower() for h in tags.get("h", "sha256").split(":")]
    if "sha256" not in hashes:
        return f"h={tags['h']} does not allow sha256, the hash the relay signs with"
    services = [v.strip().lower() for v in tags.get("s", "*").split(":")]
    if "*" not in services and "email" not in services:
        return f"s={tags['s']}: the key is not for email"
    return ""


def _key_problem(key_type: str, raw: bytes) -> str:
    if key_type == "ed25519":
        return "" if len(raw) == 32 else f"an Ed25519 key is 32 bytes, p= has {len(raw)}"
    try:
        key = load_der_public_key(raw)
    except ValueError:
        return "p= is not an RSA public key"
    if not isinstance(key, rsa.RSAPublicKey):
        return "p= is not an RSA public key"
    if key.key_size < 1024:
        return f"RSA key of {key.key_size} bits (receivers ignore keys under 1024 bits)"
    return ""
