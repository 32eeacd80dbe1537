"""ACME (RFC 8555) for the listener certificate: the HTTP-01 challenge, renewal in the background.

With ``server.acme_directory_url`` set, one process of the node (the only one, or the supervisor of
``server.workers > 1``) runs an :class:`AcmeManager` thread (never a worker). It keeps ``<data_dir>/acme/``:

* ``account.key``: the ACME account's key (EC P-256), created on the first order;
* ``certificate.key`` and ``certificate.pem``: the listener certificate's key and chain (leaf
  first), replaced together under ``.lock`` (a reader takes the lock shared: never one file's new
  version beside the other's old one; a replacement cut short by a crash is completed by the next
  process to take the lock: files.py ``replace_pair``).

Every file is written atomically (temporary file, fsync, rename, fsync of the directory), mode 0600.

An order answers the HTTP-01 challenge with a small HTTP server on ``server.acme_http_listen``
that runs only while the order is pending: it answers ``GET /.well-known/acme-challenge/<token>``
for the order's tokens and 404 to anything else. The certificate is renewed when it expires within
``acme_renew_before``; the expiry is looked at every ``acme_check_interval`` (also the least time
between two orders). A failure (CA unreachable, challenge refused) is logged with the CA's problem
document and retried after min(1 minute, acme_check_interval), doubling up to 6 hours (or after
the CA's Retry-After, a rate limit's, if longer; at most 6 hours too); the
listeners keep the certificate they have (or, before the first one, STARTTLS is not offered).

Several nodes on one PostgreSQL queue (``queue.store = "postgresql"``) run one ACME client for
the cluster (:class:`ClusterShare`): the node holding an advisory lock on the names orders, and
publishes the certificate (chain and key) and the pending challenge tokens in the queue database;
every node copies the certificate into its own files and runs the challenge responder all the
time, answering tokens from the database (the CA may reach any node behind the load balancer).

The listeners take the files as their certificate (smtp/tls.py ``listener_files``): every process
of the node watches ``certificate.pem`` (``Relay.watch_config``, every 2 s) and swaps its TLS
contexts when it changes, as a reload does for a renewed file: sessions stay open, new ones get
the new certificate. The ACME client itself is httpx + cryptography: JWS ES256, no other
dependency.

The package, one module a concern (each can be read alone):

* ``files.py``: the files under ``<data_dir>/acme``, their lock and atomic writes;
* ``protocol.py``: the RFC 8555 client (JWS, nonces, account, orders);
* ``responder.py``: the HTTP-01 challenge responder;
* ``cluster.py``: sharing one certificate through the queue database;
* ``verify.py``: what the CA returned, checked before it is installed;
* ``manager.py``: when to order, the back-off, the background loop.

This module re-exports the names the rest of RelayGate (and its tests) import from
``relaygate.acme``.
"""

from __future__ import annotations

from relaygate.acme.files import ACME_DIR, acme_files, files_lock
from relaygate.acme.manager import AcmeManager, acme_domains, acme_enabled, reconcile
from relaygate.acme.protocol import AcmeClient, AcmeError
from relaygate.acme.responder import ChallengeResponder
from relaygate.acme.verify import CertificateRefused, check_issued

__all__ = [
    "ACME_DIR",
    "AcmeClient",
    "AcmeError",
    "AcmeManager",
    "CertificateRefused",
    "ChallengeResponder",
    "acme_domains",
    "acme_enabled",
    "acme_files",
    "check_issued",
    "files_lock",
    "reconcile",
]
