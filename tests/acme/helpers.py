"""Pebble (Let's Encrypt's ACME test server, Debian's `pebble`) and `relaygate serve`, on loopback.

`Pebble` writes a config (its API's HTTPS certificate made here, issued by a CA of the test), starts
``pebble -config FILE -dnsserver 127.0.0.1:PORT`` with PEBBLE_VA_NOSLEEP=1 and
PEBBLE_VA_ALWAYS_VALID=0 (it really fetches the HTTP-01 answer, from the port `http_port` of the
address the test's DNS server gives for the name) and reads its issuing root from the management
API (/roots/0). `Relay` runs `relaygate serve` as a subprocess with acme_* settings.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.smtp.helpers import free_port
from tests.support.serve_process import wait_for_ready_line

ROOT = Path(__file__).resolve().parents[2]
PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_api_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and, issued by it, pebble's API certificate for 127.0.0.1 / localhost:
    (ca.pem, api.pem, api.key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Test ACME API CA"))
        .issuer_name(_name("Test ACME API CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "api-ca.pem", folder / "api.pem", folder / "api.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class Pebble:
    """pebble on 127.0.0.1 (API and management ports), validating HTTP-01 on `http_port`."""

    def __init__(self, folder: Path, dns_address: str, *, validity_seconds: int = 0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca_file, cert, key = make_api_certificate(folder)
        self.port, self.mgmt_port = free_port(), free_port()
        self.http_port = free_port()  # where pebble's VA fetches the challenge answers
        settings: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": self.http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if validity_seconds:
            settings["certificateValidityPeriod"] = validity_seconds
        self.config = folder / "pebble.json"
        self.config.write_text(json.dumps({"pebble": settings}))
        self.log = folder / "pebble.log"
        self.dns_address = dns_address
        self.proc: subprocess.Popen[bytes] | None = None

    def api_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> Pebble:
        env = dict(
            os.environ,
            PEBBLE_VA_NOSLEEP="1",
            PEBBLE_VA_ALWAYS_VALID="0",
            PEBBLE_WFE_NONCEREJECT="0",
            PEBBLE_AUTHZREUSE="0",
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PEBBLE, "-config", str(self.config), "-dnsserver", self.dns_address],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

        def up() -> bool:
            try:
                r = httpx.get(self.directory_url, verify=self.api_context(), timeout=2)
            except httpx.HTTPError:
                return False
            return r.status_code == 200

        if not wait_until(up, timeout=20):
            self.stop()
            raise AssertionError(f"pebble did not start:\n{self.log.read_text()}")
        return self

    def root_pem(self) -> bytes:
        """The root that issues the certificates (management API /roots/0)."""
        r = httpx.get(
            f"https://127.0.0.1:{self.mgmt_port}/roots/0", verify=self.api_context(), timeout=5
        )
        r.raise_for_status()
        return r.content

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


CONFIG = """\
[server]
name = "{node_name}"
fqdn = "{fqdn}"
data_dir = "{data}"
workers = {workers}
acme_directory_url = "{directory}"
acme_email = "hostmaster@acme.test"
acme_http_listen = "{http_host}:{http_port}"
acme_ca_file = "{ca_file}"
acme_renew_before = "{renew_before}"
acme_check_interval = "{check_interval}"
{server_extra}

[admin]
enabled = false
{queue}

[[accepted_domains]]
domain = "corp.example"

[[receive_connectors]]
name = "Relay"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["Tls"]
permission_groups = ["AnonymousUsers"]
tarpit_interval = "00:00:00"
connection_inactivity_timeout = "00:01:00"
{implicit}
"""

IMPLICIT = """
[[receive_connectors]]
name = "Implicit"
bindings = ["127.0.0.1:{implicit_port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["Tls"]
permission_groups = ["AnonymousUsers"]
tls_mode = "implicit"
tarpit_interval = "00:00:00"
"""


class Relay:
    """`relaygate serve` in a subprocess with the acme_* settings for `pebble`."""

    def __init__(
        self,
        tmp: Path,
        pebble: Pebble,
        *,
        fqdn: str = "relay.acme.test",
        workers: int = 1,
        renew_before: str = "30.00:00:00",
        check_interval: str = "01:00:00",
        server_extra: str = "",
        implicit: bool = False,
        http_host: str = "127.0.0.1",
        database_url: str = "",
        node_name: str = "RELAY01",
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.implicit_port = free_port() if implicit else 0
        self.data = tmp / "data"
        self.config = tmp / "relaygate.toml"
        self.stderr = tmp / "serve.stderr"
        self.config.write_text(
            CONFIG.format(
                fqdn=fqdn,
                data=self.data,
                workers=workers,
                directory=pebble.directory_url,
                http_port=pebble.http_port,
                http_host=http_host,
                node_name=node_name,
                queue=(
                    f'\n[queue]\nstore = "postgresql"\ndatabase_url = "{database_url}"\n'
                    if database_url
                    else ""
                ),
                ca_file=pebble.ca_file,
                renew_before=renew_before,
                check_interval=check_interval,
                server_extra=server_extra,
                port=self.port,
                implicit=IMPLICIT.format(implicit_port=self.implicit_port) if implicit else "",
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Relay:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        env.pop("RELAYGATE_CONFIG", None)
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relaygate", "serve", "--config", str(self.config)],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,
                env=env,
            )
        found = wait_for_ready_line(self.proc)
        if found is None:
            self.stop()
            raise AssertionError(f"relaygate serve did not start:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(45)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    @property
    def cert_file(self) -> Path:
        return self.data / "acme" / "certificate.pem"


def client_context(root_pem: bytes) -> ssl.SSLContext:
    """Trusts pebble's issuing root only, and checks host names."""
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    return ctx


def starttls_certificate(
    port: int, root_pem: bytes, server_name: str = "relay.acme.test", source: str = "127.0.0.1"
) -> x509.Certificate:
    """The certificate a verifying client sees after STARTTLS (smtplib, host name checked)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as smtp:
        smtp._host = server_name  # the name STARTTLS checks (connected by address, loopback only)
        smtp.ehlo("client.acme.test")
        smtp.starttls(context=client_context(root_pem))
        der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        smtp.ehlo("client.acme.test")
        smtp.noop()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def implicit_certificate(
    port: int, root_pem: bytes, server_name: str = "relay.acme.test"
) -> x509.Certificate:
    ctx = client_context(root_pem)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert tls.recv(512).startswith(b"220")
    assert der is not None
    return x509.load_der_x509_certificate(der)


def san_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def ehlo_keywords(port: int) -> list[str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        code, text = smtp.ehlo("client.acme.test")
        assert code == 250
        return [line.split()[0].upper() for line in text.decode().splitlines()[1:]]


def file_serial(path: Path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


def attempt(f: Callable[[], Any]) -> Any:
    """f(), or None if it raises (for wait_until)."""
    try:
        return f()
    except (OSError, smtplib.SMTPException, ssl.SSLError, ValueError):
        return None


def relaygate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("RELAYGATE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "relaygate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
