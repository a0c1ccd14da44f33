"""TLS for the webhook: a generated self-signed CA and server certificate (``--dev``), and
certificate files that are re-read when cert-manager or the chart rotates them."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger("pluto.operator.tls")


@dataclass(frozen=True)
class Certificate:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _common_name(hosts: list[str]) -> str:
    """The first host, when it fits X.509's 64 characters; clients check the SANs, so the
    common name is only a label (a longer host would make the certificate impossible)."""
    return hosts[0] if 0 < len(hosts[0]) <= 64 else "pluto webhook"


def self_signed(hosts: list[str], days: int = 365) -> Certificate:
    """A CA and a server certificate for ``hosts`` (DNS names or IP addresses) signed by it.

    The API server verifies the webhook against the CA in ``caBundle`` and the host of the
    webhook URL against the SANs, so every name the URL may use must be in ``hosts``.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pluto webhook CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _common_name(hosts))]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Certificate(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write_certificate(cert: Certificate, directory: Path) -> tuple[Path, Path]:
    """Write the server certificate and key (0600) to ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_bytes(cert.key_pem)
    return cert_file, key_file


class ReloadingContext:
    """A server SSL context whose certificate follows the files it was loaded from.

    cert-manager and the chart's Secret update the mounted files in place (an atomic symlink
    swap); new TLS handshakes pick the new certificate up, open connections keep theirs.
    """

    def __init__(self, cert_file: Path, key_file: Path, check_every: float = 30.0) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.check_every = check_every
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._read_stamp()
        self.context.load_cert_chain(cert_file, key_file)

    def _read_stamp(self) -> tuple[float, float]:
        return (self.cert_file.stat().st_mtime, self.key_file.stat().st_mtime)

    def reload_if_changed(self) -> bool:
        try:
            stamp = self._read_stamp()
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            # Mid-rotation the pair can be briefly inconsistent: keep serving the old one.
            logger.warning("TLS certificate not reloaded yet: %s", exc)
            return False
        self._stamp = stamp
        logger.info("TLS certificate reloaded from %s", self.cert_file)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            self.reload_if_changed()
