"""When to order and what to do with the result: :class:`AcmeManager`, the background thread
that checks the certificate's expiry and names, orders through the client, retries with
back-off, installs the files and, on a cluster, drives :class:`ClusterShare`; and
``acme_enabled`` / ``acme_domains``, which read the settings.

Kept apart because it is the policy (when, how often, what happens on failure); the protocol,
the responder, the files and the cluster sharing are each in their own module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relaygate.acme.cluster import ClusterShare
from relaygate.acme.files import (
    ACCOUNT_KEY_FILE,
    ACME_DIR,
    DIRECTORY_FILE,
    NAMES_FILE,
    REFUSED_FILE,
    acme_files,
    complete_replacement,
    files_lock,
    read_directory,
    read_names,
    replace_pair,
    write_private,
)
from relaygate.acme.protocol import (
    REQUEST_TIMEOUT,
    AcmeClient,
    AcmeError,
    Issued,
    _load_or_create_key,
)
from relaygate.acme.responder import ChallengeResponder
from relaygate.acme.verify import CertificateRefused, check_issued, dns_names, renewal_time

logger = logging.getLogger("relaygate.acme")

#: Failure back-off: the first retry after min(this, acme_check_interval), doubling up to MAX.
RETRY_FIRST = 60.0
RETRY_MAX = 6 * 3600.0


def _asked_to_wait(exc: Exception) -> float:
    """The seconds the CA asked to wait (Retry-After: a rate limit, RFC 8555 §6.6; maintenance):
    retrying sooner is refused again, and counts against the account. At most RETRY_MAX: a
    Retry-After of days must not let the certificate expire unrenewed."""
    asked = exc.retry_after if isinstance(exc, AcmeError) else None
    return min(asked, RETRY_MAX) if asked is not None else 0.0


def acme_enabled(server: Any) -> bool:
    return bool(getattr(server, "acme_directory_url", ""))


def acme_domains(server: Any) -> tuple[str, ...]:
    """The certificate's names: ``acme_domains``, or the server's fqdn; as the CA and the
    certificate write them (lower case, no final dot), each once."""
    names = tuple(server.acme_domains) or (str(server.fqdn),)
    return tuple(dict.fromkeys(n.lower().rstrip(".") for n in names))


def reconcile(manager: AcmeManager | None, config: Any) -> AcmeManager | None:
    """A reloaded configuration's ACME applied to the process's running client (`manager`, None
    if there is none): turned on, a client is started (it orders if there is no certificate
    for the names yet); turned off, the running one is stopped (without waiting for it: it ends
    at its next poll and installs nothing more); on a cluster, new names or a new
    acme_http_listen start a client anew (the lock and the responder depend on them); else the
    settings are applied (new names or CA: a new order now). Returns the client now running."""
    s = config.server
    if manager is None:
        if not acme_enabled(s):
            return None
        logger.info(
            "ACME: turned on by the reload: certificate for %s from %s",
            ", ".join(acme_domains(s)),
            s.acme_directory_url,
        )
        return _start(config)
    if not acme_enabled(s):
        logger.info(
            "ACME: turned off by the reload: the client stops; the listeners take the configured "
            "certificate files (or the self-signed certificate)"
        )
        manager.stop(wait=False)
        return None
    old = manager.config.server
    if manager.cluster is not None and (
        acme_domains(old) != acme_domains(s) or old.acme_http_listen != s.acme_http_listen
    ):
        manager.stop(wait=False)
        return _start(config)
    manager.apply(config)
    return manager


def _start(config: Any) -> AcmeManager | None:
    """A client started for a reloaded configuration; None (logged) if it cannot start: the
    relay runs on, and the next reload tries again."""
    started = AcmeManager(config)
    try:
        started.start()
    except OSError as exc:  # <data_dir>/acme cannot be made
        logger.error(
            "ACME: the client cannot start (server.acme_directory_url): %s; no certificate is "
            "ordered until a reload succeeds in starting it",
            exc,
        )
        return None
    return started


class AcmeManager:
    """Keeps the ACME certificate of ``config.server`` fresh, in a thread of its own.

    ``on_renewed()`` is called (from that thread) after new files are in place."""

    def __init__(self, config: Any, *, on_renewed: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_renewed = on_renewed
        self._stop = threading.Event()
        #: set by `apply` (new names or CA: look now) and `stop`: ends the wait between checks
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        #: queue.store = "postgresql": one ACME client for the cluster (ClusterShare), and a
        #: challenge responder that runs all the time on every node
        self.cluster: ClusterShare | None = None
        self.responder: ChallengeResponder | None = None
        self._leading: bool | None = None
        self._responder_failed = False
        #: the chain in the queue database last refused (`_cluster_step`): not checked again
        self._refused_chain = b""
        if getattr(config.queue, "store", "sqlite") == "postgresql" and config.queue.database_url:
            self.cluster = ClusterShare(config.queue.database_url, acme_domains(config.server))

    @property
    def folder(self) -> Path:
        return Path(self.config.server.data_dir) / ACME_DIR

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self._thread = threading.Thread(target=self._run, name="relaygate-acme", daemon=True)
        self._thread.start()

    def stop(self, *, wait: bool = True) -> None:
        """Stop the client. `wait` False (a reload that turns ACME off or replaces the client):
        do not wait for the thread, which ends at its next poll and installs nothing more."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and wait:
            # a pending order stops at its next poll; an HTTP request takes at most this long
            self._thread.join(REQUEST_TIMEOUT + 10)
        if self.responder is not None:
            self.responder.stop()
        if self.cluster is not None:
            self.cluster.close()

    def _cluster_step(self) -> bool:
        """A cluster node: the responder up, the published certificate in this node's files.
        True: this node runs the ACME client now."""
        assert self.cluster is not None
        s = self.config.server
        if self.responder is None or not self.responder.running:
            from relaygate.config.values import parse_binding

            listen = parse_binding(s.acme_http_listen)
            responder = ChallengeResponder(listen.address, listen.port, lookup=self.cluster.lookup)
            responder.publish = self.cluster.put_token
            try:
                responder.start()
            except OSError as exc:
                # Logged, and tried again at the next step; the certificate the cluster
                # publishes is still taken below (a node that orders itself fails its order).
                if not self._responder_failed:
                    logger.error(
                        "ACME: the HTTP-01 responder cannot listen on %s "
                        "(server.acme_http_listen): %s; the CA's requests must reach another "
                        "node",
                        s.acme_http_listen,
                        exc.strerror or exc,
                    )
                self._responder_failed = True
            else:
                self.responder = responder
                self._responder_failed = False
        leading = self.cluster.lead()
        if leading != self._leading:
            logger.info(
                "ACME: %s",
                "this node runs the cluster's ACME client for "
                f"{self.cluster.names} (lock in the queue database)"
                if leading
                else f"another node runs the cluster's ACME client for {self.cluster.names}; "
                "this node takes the certificate from the queue database",
            )
            self._leading = leading
        published = self.cluster.fetch()
        if published is not None:
            chain, key = published
            cert_path, _key_path = acme_files(Path(s.data_dir))
            try:
                current = cert_path.read_bytes()
            except OSError:
                current = b""
            if current != chain and chain != self._refused_chain:
                # checked as an order's (but for renewal: the node that ordered it renews it);
                # refused, it is logged once and this step goes on (the node leading orders
                # anew when its own is due; the others look again at the next step)
                try:
                    self._check(chain, key, renew_before=None)
                except CertificateRefused as exc:
                    self._refused_chain = chain
                    logger.error(
                        "ACME: the certificate for %s in the queue database is not installed: "
                        "%s; %s",
                        ", ".join(acme_domains(s)),
                        exc,
                        "the listeners keep the current certificate"
                        if current
                        else "STARTTLS is not offered until one is installed",
                    )
                else:
                    self._install(chain, key, "taken from the queue database")
        return leading

    def _install(
        self,
        chain: bytes,
        key: bytes,
        how: str,
        domains: tuple[str, ...] | None = None,
        directory: str | None = None,
    ) -> None:
        """Both files, replaced together under the lock; logged; `on_renewed`."""
        from cryptography import x509

        s = self.config.server
        if self._stop.is_set():  # stopped (ACME off, or replaced by a reload) while ordering
            logger.info("ACME: a certificate came after the client was stopped: not installed")
            return
        leaf = x509.load_pem_x509_certificates(chain)[0]
        cert_path, _key_path = acme_files(Path(s.data_dir))
        # the names ordered (a reload may have changed acme_domains meanwhile: then `due`
        # finds "names changed" and the new ones are ordered next)
        domains = domains or acme_domains(s)
        directory = directory or s.acme_directory_url
        self.folder.mkdir(parents=True, exist_ok=True)
        with files_lock(Path(s.data_dir), exclusive=True):
            replace_pair(Path(s.data_dir), key, chain)
            write_private(self.folder / NAMES_FILE, "".join(f"{d}\n" for d in domains).encode())
            write_private(self.folder / DIRECTORY_FILE, f"{directory}\n".encode())
        with contextlib.suppress(FileNotFoundError):
            (self.folder / REFUSED_FILE).unlink()
        extra = sorted(dns_names(leaf) - set(domains))
        logger.info(
            "ACME: certificate for %s %s (serial %x, valid until %s%s): %s",
            ", ".join(domains),
            how,
            leaf.serial_number,
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
            f"; the CA added {', '.join(extra)}" if extra else "",
            cert_path,
        )
        if self.on_renewed is not None:
            try:
                self.on_renewed()
            except Exception:
                logger.exception("ACME: swapping in the new certificate failed")

    def _check(
        self,
        chain: bytes,
        key: bytes,
        *,
        renew_before: Any,
        domains: tuple[str, ...] | None = None,
    ) -> None:
        """`check_issued` for `domains` (the names ordered; None: the configured ones); a
        refusal is recorded in refused.json (for `relaygate audit`) and raised: the failure
        path, the files untouched."""
        domains = domains or acme_domains(self.config.server)
        try:
            check_issued(chain, key, domains, renew_before=renew_before)
        except CertificateRefused as exc:
            self._record_refused(exc, domains)
            raise

    def _record_refused(
        self, exc: CertificateRefused, domains: tuple[str, ...] | None = None
    ) -> None:
        s = self.config.server
        record = {
            "check": exc.check,
            "detail": exc.detail,
            "domains": list(domains or acme_domains(s)),
            "directory_url": s.acme_directory_url,
            "at": f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}",
        }
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            write_private(self.folder / REFUSED_FILE, json.dumps(record).encode())

    def apply(self, config: Any) -> None:
        """A reloaded configuration: its acme_* settings are used from the next check on; a
        change of the names or of the CA is looked at now (a new order)."""
        old = self.config.server
        self.config = config
        new = config.server
        if acme_domains(old) != acme_domains(new) or (
            old.acme_directory_url != new.acme_directory_url
        ):
            self._wake.set()

    def due(self, now: datetime | None = None) -> str | None:
        """Why a certificate is to be ordered now (None: the current one is good)."""
        s = self.config.server
        cert, key = acme_files(Path(s.data_dir))
        # a replacement cut short by a crash is completed, not taken for a mismatched pair
        complete_replacement(Path(s.data_dir))
        if not cert.exists() or not key.exists():
            return "no certificate yet"
        from cryptography import x509

        try:
            leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
        except (OSError, ValueError, IndexError):
            return f"{cert} cannot be read"
        names = dns_names(leaf)
        # the names it was ordered for (a CA may add some); not recorded (an older run): its own
        ordered = read_names(Path(s.data_dir))
        ordered = names if ordered is None else ordered
        wanted = set(acme_domains(s))
        if ordered != wanted or not wanted <= names:
            return f"names changed ({', '.join(sorted(ordered))} → {', '.join(sorted(wanted))})"
        # the CA it came from (a reload from a staging CA to the production one); not recorded
        # (an older run): not due for that
        came_from = read_directory(Path(s.data_dir))
        if came_from is not None and came_from != s.acme_directory_url:
            return f"CA changed ({came_from} → {s.acme_directory_url})"
        from cryptography.hazmat.primitives import serialization

        try:
            private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            return f"{key} cannot be read"
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
            # a replacement interrupted between the key's rename and the chain's
            return f"{key} is not the key of {cert}"
        now = now or datetime.now(UTC)
        # at most two thirds of the certificate's life ahead: a CA's short-lived certificates
        # (step-ca: 24 h) are not ordered anew at every check when acme_renew_before is longer
        # than their whole life (each serves a third of it at least)
        if renewal_time(leaf, s.acme_renew_before) <= now:
            return (
                f"expires {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}, within acme_renew_before"
            )
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            interval = self.config.server.acme_check_interval.total_seconds()
            try:
                if self.cluster is not None and not self._cluster_step():
                    # another node orders; look again soon (it may die, or renew)
                    self.failures = 0
                    self._sleep(min(interval, 60.0))
                    continue
                reason = self.due()
                if reason is not None:
                    self.obtain(reason)
                elif not self._refused_chain:
                    # the certificate is good for the names configured: a refusal recorded
                    # before (names since removed, ACME off and on) is no longer in question
                    with contextlib.suppress(FileNotFoundError):
                        (self.folder / REFUSED_FILE).unlink()
                self.failures = 0
                wait = interval
            except Exception as exc:  # a thread boundary: log, keep serving, retry later
                if self._stop.is_set():  # stopped meanwhile (ACME off): nothing to retry
                    break
                self.failures += 1
                # (the exponent capped: 2 ** 1024 does not convert to a float)
                doubling = 2 ** min(self.failures - 1, 32)
                wait = min(min(RETRY_FIRST, interval) * doubling, RETRY_MAX)
                wait = max(wait, _asked_to_wait(exc))
                self._log_failure(exc, wait)
            self._sleep(wait)

    def _sleep(self, seconds: float) -> None:
        """Until the next check: `seconds`, or less if `apply` or `stop` wakes the thread."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _log_failure(self, exc: Exception, wait: float) -> None:
        s = self.config.server
        cert, _key = acme_files(Path(s.data_dir))
        keeps = (
            "the listeners keep the current certificate"
            if cert.exists()
            else "STARTTLS is not offered (and implicit-TLS listeners use the self-signed "
            "certificate) until one is obtained"
        )
        detail = str(exc) if isinstance(exc, AcmeError | OSError) else repr(exc)
        logger.error(
            "ACME: cannot obtain a certificate for %s from %s (failure %d): %s; retry in %.0f s; %s",
            ", ".join(acme_domains(s)),
            s.acme_directory_url,
            self.failures,
            detail,
            wait,
            keeps,
        )

    def obtain(self, reason: str) -> Issued:
        """One order, now: account (created if need be), challenge, certificate, files."""
        s = self.config.server
        domains = acme_domains(s)
        logger.info(
            "ACME: ordering a certificate for %s from %s (%s)",
            ", ".join(domains),
            s.acme_directory_url,
            reason,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        account_key = _load_or_create_key(self.folder / ACCOUNT_KEY_FILE)
        from relaygate.config.values import parse_binding

        listen = parse_binding(s.acme_http_listen)
        client = AcmeClient(
            s.acme_directory_url,
            account_key,
            email=s.acme_email,
            ca_file=s.acme_ca_file,
            stop=self._stop,
        )
        if self.cluster is not None and self.responder is None:
            client.close()
            raise AcmeError(
                f"the HTTP-01 responder cannot listen on {s.acme_http_listen} "
                "(server.acme_http_listen): this node cannot order for the cluster"
            )
        try:
            client.register()
            if self.responder is not None:  # a cluster's: runs all the time
                responder = self.responder
                try:
                    issued = client.order(domains, responder)
                finally:
                    tokens, responder.tokens = list(responder.tokens), {}
                    if self.cluster is not None:
                        with contextlib.suppress(Exception):
                            self.cluster.drop_tokens(tokens)
            else:
                responder = ChallengeResponder(listen.address, listen.port)
                try:
                    responder.start()
                except OSError as exc:
                    raise AcmeError(
                        f"the HTTP-01 responder cannot listen on {s.acme_http_listen} "
                        f"(server.acme_http_listen): {exc.strerror or exc}"
                    ) from exc
                try:
                    issued = client.order(domains, responder)
                finally:
                    responder.stop()
        except CertificateRefused as exc:  # not PEM (the client parses it): as the other checks
            self._record_refused(exc, domains)
            raise
        finally:
            client.close()
        # Before anything is written or swapped: what the CA returned is what was ordered
        # (`domains`, even if a reload changed acme_domains while the order was pending).
        self._check(
            issued.chain_pem, issued.key_pem, renew_before=s.acme_renew_before, domains=domains
        )
        if self.cluster is not None:  # first: the other nodes copy it from there
            self.cluster.publish(issued.chain_pem, issued.key_pem)
        self._install(issued.chain_pem, issued.key_pem, "installed", domains, s.acme_directory_url)
        return issued
