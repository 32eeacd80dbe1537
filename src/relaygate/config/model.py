"""The typed configuration: frozen dataclasses, every default in one place.

Keys are the snake_case form of Exchange's parameter names and defaults are Exchange 2019's
(shared/reference/exchange-semantics.md §1.4), with one deliberate difference, safer:
`bare_linefeed_rejection_enabled` defaults to true (SMTP smuggling). `chunking_enabled` and
`binary_mime_enabled` keep Exchange's default (true) for imported configs but advertise nothing:
BDAT is not implemented. DSN is never advertised either (no success reports are made);
`delivery_status_notification_enabled` says whether its MAIL/RCPT parameters are taken, and
honoured in the relay's own reports (docs/exchange-parity.md).

Each field's `metadata["parse"]` names the value parser the loader applies; a field without one takes
the TOML value as it is after a type check against the default.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from relaygate.address_patterns import AddressRule
from relaygate.config import values as v
from relaygate.dkim.defaults import SIGNED_HEADERS

__all__ = [
    "AcceptedDomain",
    "AdminConfig",
    "Config",
    "DkimKey",
    "Permission",
    "QueueConfig",
    "ReceiveConnector",
    "SendConnector",
    "ServerConfig",
]


def _spec(
    default: Any, parse: Any = None, *, factory: Any = None, choices: tuple[str, ...] = ()
) -> Any:
    meta: dict[str, Any] = {}
    if parse is not None:
        meta["parse"] = parse
    if choices:
        meta["choices"] = choices
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _span(default: str) -> Any:
    return _spec(v.parse_timespan(default), v.parse_timespan)


def _size(default: int | str) -> Any:
    return _spec(v.parse_size(default), v.parse_size)


#: `server.workers` accepts 1..MAX_WORKERS (or "auto": one per CPU, capped at this).
MAX_WORKERS = 64

UNLIMITED = None  # an `int | None` limit of None means "unlimited", as Exchange prints it

AUTH_MECHANISMS = (
    "None",
    "Tls",
    "Integrated",
    "BasicAuth",
    "BasicAuthRequireTLS",
    "ExchangeServer",
    "ExternalAuthoritative",
)
PERMISSION_GROUPS = (
    "None",
    "AnonymousUsers",
    "ExchangeUsers",
    "ExchangeServers",
    "ExchangeLegacyServers",
    "Partners",
    "Custom",
)
USAGES = ("Custom", "Internet", "Internal", "Client", "Partner")
DOMAIN_TYPES = ("Authoritative", "InternalRelay", "ExternalRelay")
TRANSPORT_ROLES = ("FrontendTransport", "HubTransport")


@dataclass(frozen=True, slots=True)
class Permission:
    """One Add-ADPermission grant: an extended right given to a principal on a connector."""

    user: str
    extended_rights: tuple[str, ...]
    deny: bool = False


@dataclass(frozen=True, slots=True)
class ReceiveConnector:
    """A receive connector (New-ReceiveConnector). Limits of None are 'unlimited'."""

    name: str
    transport_role: str = _spec("FrontendTransport", choices=TRANSPORT_ROLES)
    usage: str = _spec("Custom", choices=USAGES)
    enabled: bool = True
    bindings: tuple[v.Binding, ...] = _spec((), factory=tuple)
    remote_ip_ranges: tuple[v.IPRange, ...] = _spec((), factory=tuple)
    auth_mechanism: tuple[str, ...] = _spec(("Tls",), factory=lambda: ("Tls",))
    permission_groups: tuple[str, ...] = _spec((), factory=tuple)
    permissions: tuple[Permission, ...] = _spec((), factory=tuple)
    #: Who may send through this connector (RelayGate's own; smtprelay's allowed_sender): the MAIL
    #: FROM address, and every address of the From header, must match one entry ("scan@corp.example",
    #: "*@corp.example", "*@*.corp.example", "*@*", "<>"). Empty (the default): no restriction beyond
    #: the connector's rights. Applies to every session, authenticated or not.
    allowed_senders: tuple[AddressRule, ...] = _spec((), factory=tuple)
    #: To whom: every RCPT TO must match one entry (same forms, no "<>"), in addition to the relay
    #: rules (it narrows what the rights allow, never widens it). Empty: no restriction.
    allowed_recipients: tuple[AddressRule, ...] = _spec((), factory=tuple)
    fqdn: str | None = None
    banner: str | None = None
    comment: str = ""
    require_tls: bool = False
    require_ehlo_domain: bool = False
    tls_mode: str = _spec("starttls", choices=("starttls", "implicit"))
    tls_certificate_file: Path | None = _spec(None, Path)
    tls_key_file: Path | None = _spec(None, Path)
    tls_min_version: str = _spec("1.2", choices=("1.0", "1.1", "1.2", "1.3"))
    max_message_size: int = _size("36MB")
    max_header_size: int = _size("256KB")
    max_recipients_per_message: int = 200
    max_hop_count: int = 30
    max_local_hop_count: int = 8
    connection_timeout: timedelta = _span("00:10:00")
    connection_inactivity_timeout: timedelta = _span("00:05:00")
    max_inbound_connection: int | None = 5000
    max_inbound_connection_per_source: int | None = 20
    max_inbound_connection_percentage_per_source: int = 2
    max_protocol_errors: int | None = 5
    max_logon_failures: int = 3
    #: Failed AUTH per minute per client IP address (sliding window), across connections; past it
    #: AUTH is refused with 450 4.7.1 before any password is checked. RelayGate's own (Exchange
    #: limits failures per connection only): 2 × max_logon_failures' default. "unlimited": off.
    logon_failure_rate_limit: int | None = 6
    #: logon_failure_rate_limit counts an IPv6 client by the network of this many leading bits
    #: (32-128): whoever holds one address of a /64 (one subnet) holds all of them, and would get
    #: the limit's guesses from each. 128: per address. IPv4 clients: per address.
    logon_failure_ipv6_prefix_length: int = 64
    #: Messages per minute (sliding window) per source as message_rate_source names it; past it
    #: MAIL is answered 421 4.4.2. Counted for the whole node with server.workers > 1 (a table the
    #: workers share: smtp/shared_rates.py). "unlimited": off.
    message_rate_limit: int | None = UNLIMITED
    message_rate_source: str = _spec("IPAddress", choices=("None", "User", "IPAddress", "All"))
    tarpit_interval: timedelta = _span("00:00:05")
    auth_tarpit_interval: timedelta = _span("00:00:05")
    protocol_logging_level: str = _spec("None", choices=("None", "Verbose"))
    enhanced_status_codes_enabled: bool = True
    pipelining_enabled: bool = True
    chunking_enabled: bool = True
    binary_mime_enabled: bool = True
    eight_bit_mime_enabled: bool = True
    delivery_status_notification_enabled: bool = True
    size_enabled: str = _spec("Enabled", choices=("Enabled", "Disabled", "EnabledWithoutValue"))
    bare_linefeed_rejection_enabled: bool = True
    reject_reserved_top_level_recipient_domains: bool = False
    reject_reserved_second_level_recipient_domains: bool = False
    reject_single_label_recipient_domains: bool = False
    default_domain: str | None = None

    @property
    def identity_name(self) -> str:
        return self.name

    @property
    def relay_ranges_text(self) -> list[str]:
        return [r.text for r in self.remote_ip_ranges]


@dataclass(frozen=True, slots=True)
class AcceptedDomain:
    """An accepted domain: `corp.example` or `*.corp.example` (the domain and all its subdomains)."""

    domain: str
    domain_type: str = _spec("Authoritative", choices=DOMAIN_TYPES)
    default: bool = False

    @property
    def is_wildcard(self) -> bool:
        return self.domain.startswith("*.")

    def matches(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        if self.is_wildcard:
            base = self.domain[2:]
            return domain == base or domain.endswith("." + base)
        return domain == self.domain


@dataclass(frozen=True, slots=True)
class SendConnector:
    """An outbound route (New-SendConnector)."""

    name: str
    address_spaces: tuple[str, ...] = _spec(("*",), factory=lambda: ("*",))
    dns_routing_enabled: bool = True
    smart_hosts: tuple[str, ...] = _spec((), factory=tuple)
    port: int = 25
    smart_host_auth_mechanism: str = _spec(
        "None",
        choices=(
            "None",
            "BasicAuth",
            "BasicAuthRequireTLS",
            "XOAUTH2",
            "ExchangeServer",
            "ExternalAuthoritative",
        ),
    )
    auth_username: str = ""
    auth_password_file: Path | None = _spec(None, Path)
    auth_password_env: str = ""
    #: Who issues the XOAUTH2 token (RelayGate's own key): "entra" (Entra ID, the oauth_tenant_id /
    #: oauth_client_id / client secret keys) or "google" (a Google Workspace service account with
    #: domain-wide delegation, oauth_service_account_file; auth_username is the mailbox it acts as).
    oauth_provider: str = _spec("entra", choices=("entra", "google"))
    #: The Google service account's JSON key file as Google Cloud issues it (oauth_provider = "google").
    oauth_service_account_file: Path | None = _spec(None, Path)
    oauth_tenant_id: str = ""
    oauth_client_id: str = ""
    oauth_client_secret_env: str = ""
    oauth_client_secret_file: Path | None = _spec(None, Path)
    #: Instead of a client secret (RelayGate's own key): a certificate credential of the Entra ID
    #: app registration, a PEM file with the certificate (the one uploaded to the app) and its
    #: unencrypted RSA private key. Token requests carry a client assertion signed with the key.
    oauth_client_certificate_file: Path | None = _spec(None, Path)
    #: The private key in a file of its own, when oauth_client_certificate_file holds only the
    #: certificate. "" / unset: the key is in the certificate file.
    oauth_client_key_file: Path | None = _spec(None, Path)
    #: Entra ID's sign-in host (national clouds: login.microsoftonline.us, login.chinacloudapi.cn).
    oauth_authority_host: str = "https://login.microsoftonline.com"
    #: The token's scope: Exchange Online's SMTP AUTH (with oauth_provider = "google", this default
    #: stands for Gmail's https://mail.google.com/).
    oauth_scope: str = "https://outlook.office365.com/.default"
    require_tls: bool = False
    implicit_tls: bool = False
    tls_auth_level: str = _spec(
        "EncryptionOnly", choices=("EncryptionOnly", "CertificateValidation", "DomainValidation")
    )
    tls_domain: str = ""
    tls_ca_file: Path | None = _spec(None, Path)
    cost: int = 1
    enabled: bool = True
    fqdn: str | None = None
    max_message_size: int | None = _spec(None, v.parse_size)
    connection_inactivity_timeout: timedelta = _span("00:10:00")
    #: RelayGate's own: how long a TCP connect to a next hop may take (Postfix's
    #: smtp_connect_timeout), and its greeting with the reply to EHLO/HELO (smtp_helo_timeout).
    #: Never more than connection_inactivity_timeout, which bounds every other wait: a silent
    #: MX host costs this per hop, not 10 minutes.
    connect_timeout: timedelta = _span("00:00:30")
    greeting_timeout: timedelta = _span("00:05:00")
    #: Kept as Exchange has it (the importer carries it over), but no SMTP send protocol log
    #: (SmtpSend) is written: deliveries show in the message tracking log and the queue.
    protocol_logging_level: str = _spec("None", choices=("None", "Verbose"))
    comment: str = ""
    #: Pacing to the upstream's quota (RelayGate's own; Exchange has none): at most this many
    #: messages (SMTP transactions) in any rolling 60 s through this connector, shared by every
    #: worker and node. Past it, mail waits in the queue (Retry) instead of being refused upstream.
    #: Microsoft 365 SMTP AUTH: 30 per mailbox. None / "unlimited": no pacing.
    max_messages_per_minute: int | None = UNLIMITED
    #: The same for recipients in any rolling 24 hours (Microsoft 365: 10,000 per mailbox).
    max_recipients_per_day: int | None = UNLIMITED
    #: Spill-over (RelayGate's own): the name of another send connector that takes a transaction
    #: this one's pacing holds back (its smart hosts or MX, its auth, send_as and own budget;
    #: followed on through its own overflow_connector). "" = none: the mail waits.
    overflow_connector: str = ""
    #: The mailbox every message through this connector is sent as (MAIL FROM and the From
    #: header's address; the writer's address kept as display name and Reply-To): what Microsoft
    #: 365 SMTP AUTH with one mailbox requires (554 5.2.252 SendAsDenied otherwise). "" = as
    #: written. See relaygate.delivery.send_as.
    send_as: str = ""
    #: How this connector delivers (RelayGate's own key): "SMTP" (the default; smart hosts or MX)
    #: or "Graph": Microsoft Graph's sendMail over HTTPS with the oauth_* app registration, for
    #: tenants that turned SMTP AUTH off. See relaygate.delivery.graph.
    delivery_method: str = _spec("SMTP", choices=("SMTP", "Graph"))
    #: Graph's base URL (national clouds: https://graph.microsoft.us/v1.0, ...).
    graph_endpoint: str = "https://graph.microsoft.com/v1.0"
    #: The mailbox whose /users/{mailbox}/sendMail is called. "" = send_as when set, else the
    #: message's envelope sender.
    graph_mailbox: str = ""
    #: A client certificate (PEM, chain first) and its key, presented on STARTTLS and implicit TLS:
    #: Exchange's TlsCertificateName, for a Microsoft 365 inbound connector that recognises the
    #: relay by its certificate's subject, or a smart host that authenticates relays that way.
    #: Both or neither. Same key names as the receive connector's.
    tls_certificate_file: Path | None = _spec(None, Path)
    tls_key_file: Path | None = _spec(None, Path)
    #: IgnoreSTARTTLS: never STARTTLS, even when offered (a trusted link to a host whose TLS is
    #: broken). Incompatible with anything that requires TLS.
    ignore_starttls: bool = False
    #: ForceHELO: HELO instead of EHLO, so no extension is used (no STARTTLS, AUTH, PIPELINING,
    #: SIZE, 8BITMIME, SMTPUTF8).
    force_helo: bool = False
    #: SmtpMaxMessagesPerConnection: messages per SMTP session before a new connection.
    smtp_max_messages_per_connection: int = 20
    #: SourceIPAddress: the local address outbound connections bind to (None: any).
    source_ip_address: str | None = None
    #: RelayGate's own: with dns_routing_enabled, connect to MX hosts (and an implicit MX) on a
    #: loopback address (127.0.0.0/8, ::1), refused otherwise as a misconfiguration or an attack
    #: from the recipient domain's DNS: for a lab or test whose own DNS points MX records at
    #: servers on loopback. Link-local, multicast and reserved addresses stay refused, and this
    #: relay's own listeners are still a loop.
    allow_loopback_mx: bool = False


#: The bound of smtp_max_messages_per_connection (Exchange takes an Int32; no session needs more).
MAX_MESSAGES_PER_CONNECTION = 10_000


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A DKIM signing key for one domain and selector."""

    domain: str
    selector: str
    key_file: Path | None = _spec(None, Path)
    algorithm: str = _spec("rsa-sha256", choices=("rsa-sha256", "ed25519-sha256"))
    headers: tuple[str, ...] = _spec(SIGNED_HEADERS, factory=lambda: SIGNED_HEADERS)
    enabled: bool = True
    #: Also sign mail from the domain's subdomains that have no [[dkim]] entry of their own
    #: (d= this domain: DMARC's relaxed alignment accepts it, strict does not). Off: exact only.
    subdomains: bool = False


def _default_name() -> str:
    return socket.gethostname().split(".")[0].upper() or "RELAY01"


def _default_fqdn() -> str:
    name = socket.getfqdn()
    return name if name and name != "localhost" else "relay.localdomain"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: identity, storage, resolver, proxies, log rotation (Set-TransportService defaults)."""

    name: str = _spec(None, factory=_default_name)
    fqdn: str = _spec(None, factory=_default_fqdn)
    data_dir: Path = _spec(Path("./relaygate-data"), Path)
    dns_servers: tuple[str, ...] = _spec((), factory=tuple)
    trusted_proxies: tuple[v.IPRange, ...] = _spec((), factory=tuple)
    tls_certificate_file: Path | None = _spec(None, Path)
    tls_key_file: Path | None = _spec(None, Path)
    users_file: Path | None = _spec(None, Path)
    #: ACME (RFC 8555; RelayGate's own keys): the CA's directory URL, e.g.
    #: "https://acme-v02.api.letsencrypt.org/directory". Set: the relay obtains the listener
    #: certificate itself (HTTP-01 challenge), keeps it under <data_dir>/acme/ and renews it in the
    #: background (relaygate.acme); it stands for tls_certificate_file / tls_key_file, which must
    #: then be unset. "" (the default): no ACME.
    acme_directory_url: str = ""
    #: The account's contact address (mailto:), for the CA's expiry notices. "": none.
    acme_email: str = ""
    #: The names the certificate is for (dNSName SANs, the first one its subject). Empty: [fqdn].
    acme_domains: tuple[str, ...] = _spec((), factory=tuple)
    #: Where the HTTP-01 responder listens while an order is pending (all the time on the nodes
    #: of a cluster, queue.store = "postgresql"). The CA connects to port 80 of each name; a port
    #: forward or load balancer may map it to another.
    acme_http_listen: str = "0.0.0.0:80"
    #: A CA bundle (PEM) that the ACME directory's HTTPS certificate is checked against (a private
    #: CA such as step-ca or pebble). Unset: the system's trust store.
    acme_ca_file: Path | None = _spec(None, Path)
    #: Renew when the certificate expires within this span (or within two thirds of its life, if
    #: that is shorter: short-lived certificates are not ordered anew at every check).
    acme_renew_before: timedelta = _span("30.00:00:00")
    #: How often the certificate's expiry is looked at, and the least time between two orders.
    #: After a failure the first retry waits min(1 minute, this), then the wait doubles, up to 6 h.
    acme_check_interval: timedelta = _span("01:00:00")
    #: Worker processes sharing the listening ports (SO_REUSEPORT); 1 = one process, no supervisor.
    workers: int = 1
    #: How the kernel shares new connections among workers: "client_address" (all connections of
    #: one client reach one worker, so per-source limits hold relay-wide) or "connection" (every
    #: connection hashed on its own: one heavy client can use every worker; connection limits,
    #: message_rate_limit and logon_failure_rate_limit are counted for the node either way).
    worker_balance: str = _spec("client_address", choices=("client_address", "connection"))
    #: With workers > 1: a worker whose event loop has not answered the supervisor for this long
    #: (a hang: the kernel keeps handing it new connections) is killed and restarted. 0: never.
    worker_hang_timeout: timedelta = _span("00:01:00")
    dkim_domain_source: str = _spec("header_from", choices=("header_from", "envelope_sender"))
    #: Message bytes all sessions of one process may hold while they receive and commit them
    #: (smtp/limits.py DataMemory); past it a message gets 452 4.3.1. None: a quarter of the
    #: machine's memory, divided among the workers.
    max_data_in_memory: int | None = _spec(None, v.parse_size)
    receive_protocol_log_max_file_size: int = _size("10MB")
    receive_protocol_log_max_directory_size: int = _size("250MB")
    receive_protocol_log_max_age: timedelta = _span("30.00:00:00")
    message_tracking_log_enabled: bool = True
    #: Set-TransportService -MessageTrackingLogSubjectLoggingEnabled: false leaves the tracking
    #: log's message-subject field empty.
    message_tracking_log_subject_logging_enabled: bool = True
    #: The addresses written to the protocol and message tracking logs: "none" (as they are),
    #: "mask" (a***@corp.example) or "pseudonymize" (h-<12 hex digits>@corp.example, a keyed
    #: hash with the key in <data_dir>/keys/log-privacy.key; relaygate trace finds them by address).
    log_address_privacy: str = _spec("none", choices=("none", "mask", "pseudonymize"))
    #: The service log on stderr (start-up, reloads, delivery errors): "text" (time LEVEL logger:
    #: message) or "json" (one object a line: time, level, logger, message, worker, pid,
    #: exception). `relaygate serve --log-format` wins over it; a reload applies a change.
    log_format: str = _spec("text", choices=("text", "json"))
    #: The service log's least severe level: "DEBUG", "INFO", "WARNING" or "ERROR".
    #: `relaygate serve --log-level` wins over it; a reload applies a change.
    log_level: str = _spec("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    message_tracking_log_max_file_size: int = _size("10MB")
    message_tracking_log_max_directory_size: int = _size("1000MB")
    message_tracking_log_max_age: timedelta = _span("30.00:00:00")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """[admin]: the web admin centre, JSON API, /metrics and /healthz."""

    listen: str = "127.0.0.1:8025"
    enabled: bool = True
    api_token_file: Path | None = _spec(None, Path)
    #: /metrics needs the API's bearer token (``Authorization: Bearer <token>``, 401 otherwise);
    #: needs api_token_file. Off by default: scrapers without a token keep working.
    metrics_require_token: bool = False
    #: HTTPS on the listener: the certificate (PEM, chain after it) and its key, as a receive
    #: connector names them. Both or neither; neither: plain HTTP (fine on loopback only).
    tls_certificate_file: Path | None = _spec(None, Path)
    tls_key_file: Path | None = _spec(None, Path)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """[queue]: Exchange's retry and expiry timeline (§7.3); the store backing it."""

    transient_failure_retry_interval: timedelta = _span("00:05:00")
    transient_failure_retry_count: int = 6
    message_retry_interval: timedelta = _span("00:10:00")
    delay_notification_timeout: timedelta = _span("04:00:00")
    message_expiration_timeout: timedelta = _span("2.00:00:00")
    admin_notification_address: str = ""
    max_concurrent_deliveries: int = 20
    store: str = _spec("sqlite", choices=("sqlite", "postgresql"))
    #: store = "postgresql": libpq URL of the database the nodes share, e.g.
    #: "postgresql://relaygate:secret@db.corp.example/relaygate" (unused with SQLite).
    database_url: str = ""
    #: How long a delivery attempt holds a message before another worker or node may take it;
    #: renewed while the attempt runs. In a cluster: how soon a dead node's messages move on.
    lease_duration: timedelta = _span("00:30:00")
    completed_retention: timedelta = _span("1.00:00:00")
    #: Back pressure (queue/pressure.py): below this much free space on the queue's disk, MAIL
    #: FROM gets 452 4.3.1 (Exchange's fixed constant); 0 turns it off.
    min_free_disk_space: int = _size("500MB")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. `source` is the file it came from ("<embedded default>" otherwise)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    accepted_domains: tuple[AcceptedDomain, ...] = ()
    receive_connectors: tuple[ReceiveConnector, ...] = ()
    send_connectors: tuple[SendConnector, ...] = ()
    dkim: tuple[DkimKey, ...] = ()
    source: str = "<embedded default>"

    @property
    def dkim_keys(self) -> tuple[DkimKey, ...]:
        return self.dkim

    @property
    def postmaster(self) -> str:
        """``postmaster@<default accepted domain>`` (the first accepted domain when none is the
        default, the server's FQDN when there is none): Exchange's postmaster for external
        DSNs, the From of the relay's NDRs and delay notices. The organisation's domain, not
        the relay's host name: that is where DKIM keys and DMARC policies are."""
        default = next((d.domain for d in self.accepted_domains if d.default), None)
        if default is None and self.accepted_domains:
            default = self.accepted_domains[0].domain
        if default is None:
            return f"postmaster@{self.server.fqdn}"
        return f"postmaster@{default.removeprefix('*.')}"

    def ipv6_only(self, port: int) -> bool:
        """A [::] listener on `port` is IPv6-only: an enabled connector binds 0.0.0.0 there too
        (else it is dual-stack and also receives IPv4 clients, as ::ffff:a.b.c.d)."""
        return any(
            b.address == "0.0.0.0" and b.port == port
            for c in self.receive_connectors
            if c.enabled
            for b in c.bindings
        )

    def connector(self, name: str) -> ReceiveConnector | None:
        for connector in self.receive_connectors:
            if connector.name.lower() == name.lower():
                return connector
        return None
