"""The findings about who may send as the organisation: anonymous senders whose mail is DKIM-signed,
a domain whose signatures the big receivers cannot verify (Ed25519 only), authenticated users
without a send-as list.

Apart because they read the DKIM keys and the users file, not a connector's own settings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from relaygate.audit.findings import Finding
from relaygate.audit.ranges import _families_covered
from relaygate.config.model import Config
from relaygate.dkim.keys import MAX_RSA_BITS_VERIFIED, MIN_RSA_BITS_ADVISED, RSA_BITS
from relaygate.policy.rights import ACCEPT_AUTHORITATIVE_DOMAIN_SENDER, session_rights


def _dkim_findings(config: Config) -> Iterator[Finding]:
    """A connector open to every address whose anonymous sessions may send as the organisation:
    anyone can hand in a From of its domains, and RelayGate signs it with their keys (a spoof
    that passes DMARC). A session denied the right is never signed (`relaygate.smtp.session`)."""
    if not any(k.enabled for k in config.dkim):
        return
    for c in config.receive_connectors:
        if not c.enabled or not _families_covered(c.remote_ip_ranges):
            continue
        if not session_rights(c).has(ACCEPT_AUTHORITATIVE_DOMAIN_SENDER):
            continue
        yield Finding(
            "medium",
            "dkim-anyone-signed",
            c.name,
            "permissions",
            f"every address may connect and its anonymous sessions hold "
            f"{ACCEPT_AUTHORITATIVE_DOMAIN_SENDER}: anyone can send From an address of your "
            "domains and RelayGate signs it with their DKIM key, so the spoof passes DMARC",
            f'deny the right to anonymous clients (`relaygate permission add "{c.name}" '
            '--user "NT AUTHORITY\\ANONYMOUS LOGON" --extended-rights '
            f"{ACCEPT_AUTHORITATIVE_DOMAIN_SENDER} --deny`, Exchange's anti-spoofing step); "
            "their messages are then not signed",
        )


def _ed25519_only_findings(config: Config) -> Iterator[Finding]:
    """A domain whose every enabled key is Ed25519: Gmail, Microsoft 365 and Yahoo do not verify
    ed25519-sha256 (RFC 8463), so its mail has no DKIM pass there and DMARC rests on SPF alone
    (under p=reject, refused when SPF does not align). The service log warns at start; the
    audit is where an administrator reviews the configuration."""
    by_domain: dict[str, list[tuple[int, str, str]]] = {}
    for i, k in enumerate(config.dkim):
        if k.enabled:
            by_domain.setdefault(k.domain.lower(), []).append((i, k.selector, k.algorithm))
    for domain, keys in by_domain.items():
        if any(algorithm != "ed25519-sha256" for _, _, algorithm in keys):
            continue
        selectors = ", ".join(selector for _, selector, _ in keys)
        yield Finding(
            "medium",
            "dkim-ed25519-only",
            "",
            f"dkim[{keys[0][0]}].algorithm",
            f"{domain} is signed with Ed25519 only (selector {selectors}): Gmail, Microsoft 365 "
            "and Yahoo do not verify ed25519-sha256 signatures, so its mail has no DKIM pass "
            "there and DMARC rests on SPF alone",
            f"add an rsa-sha256 key for {domain} beside it (both sign): `relaygate dkim new "
            f"--domain {domain} --selector <new selector>`, publish its TXT record, add the "
            "[[dkim]] entry",
        )


def _rsa_key_size_findings(config: Config, sizes: Mapping[int, int]) -> Iterator[Finding]:
    """An RSA key of a size RFC 8301 §3.2 advises against. Under 1024 bits verifiers must not
    accept the signature (high: no DKIM pass anywhere); under 2048 signers should not use it (low);
    over 4096 a verifier need not handle it (medium: some receivers fail it). `sizes`: the bits
    of each readable enabled RSA key by `[[dkim]]` index (`relaygate.dkim.keys.rsa_key_sizes`).
    The service log warns at start; the audit is where an administrator reviews them."""
    for i, bits in sorted(sizes.items()):
        if MIN_RSA_BITS_ADVISED <= bits <= MAX_RSA_BITS_VERIFIED or i >= len(config.dkim):
            continue
        key = config.dkim[i]
        if bits < 1024:
            severity = "high"
            why = "verifiers must not accept signatures made with fewer than 1024 bits (RFC 8301)"
            why += ": its mail has no DKIM pass anywhere"
        elif bits < MIN_RSA_BITS_ADVISED:
            severity = "low"
            why = f"under the {MIN_RSA_BITS_ADVISED} bits RFC 8301 asks signers for"
        else:
            severity = "medium"
            why = (
                f"over the {MAX_RSA_BITS_VERIFIED} bits every verifier must handle (RFC 8301): "
                "some receivers fail such a signature"
            )
        yield Finding(
            severity,
            "dkim-rsa-key-size",
            "",
            f"dkim[{i}].key_file",
            f"the DKIM key of {key.domain} (selector {key.selector}) is an RSA key of {bits} "
            f"bits, {why}",
            f"make a {RSA_BITS}-bit key under a new selector: `relaygate dkim new --domain "
            f"{key.domain} --selector <new selector>`, publish its TXT record, point "
            f"dkim[{i}] at it",
        )


def _send_as_findings(config: Config, unlisted: Sequence[str]) -> Iterator[Finding]:
    """A BasicAuth connector where users without a send-as list may submit: each may send as any
    sender the connector allows (any address of your domains, with ExchangeUsers), and with DKIM
    on, RelayGate signs what it wrote. Medium when that holds (signing on, no allowed_senders),
    low otherwise."""
    if not unlisted:
        return
    signing = any(k.enabled for k in config.dkim)
    for c in config.receive_connectors:
        if not c.enabled or "BasicAuth" not in c.auth_mechanism:
            continue
        users = [u for u in unlisted if session_rights(c, authenticated_user=u).may_submit]
        if not users:
            continue
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        scope = (
            f"any sender allowed_senders lists ({', '.join(r.text for r in c.allowed_senders)})"
            if c.allowed_senders
            else "any sender the connector's rights allow"
        )
        signed = " and RelayGate DKIM-signs what they write" if signing else ""
        yield Finding(
            "medium" if signing and not c.allowed_senders else "low",
            "auth-users-without-send-as",
            c.name,
            "users_file (send_as)",
            f"user(s) {shown} have no send-as list: after AUTH on this connector each may send "
            f"as {scope}{signed}",
            f"give each user the addresses it sends as: `relaygate user send-as {users[0]} "
            f"'{users[0]}@yourdomain'` (patterns as in allowed_senders)",
        )
