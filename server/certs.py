"""fedmeta-certs: a development CA, a server certificate and client certificates (PEM files).

For compose files, tests and trials; use your organisation's PKI in production.
Keys are ECDSA P-256; a client certificate's CN and DNS SAN are the client id, which
the coordinator matches against the id a client claims under --require-client-cert.
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
from pathlib import Path

from fedmeta.common.cli import OneLineErrorParser
from fedmeta.common.config import check_client_id
from fedmeta.server.private_files import write_file


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Private keys are born 0600 (server/private_files.py); certificates are public, 0644."""
    write_file(path, data, mode=0o600 if private else 0o644)


def generate(out: Path, *, server_names: list[str], clients: list[str], days: int = 365) -> list[Path]:
    """Write ca.pem, ca-key.pem, server.pem, server-key.pem and client-<id>.pem / client-<id>-key.pem."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise SystemExit("fedmeta-certs: error: needs the cryptography package: pip install 'fedmeta[certs]'") from None

    now = datetime.datetime.now(datetime.timezone.utc)
    out.mkdir(parents=True, exist_ok=True)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmeta development"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedmeta development CA")).issuer_name(name("fedmeta development CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    written = [out / "ca.pem", out / "ca-key.pem"]
    _write(written[0], ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(written[1], key_pem(ca_key), private=True)

    def leaf(cn: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier, stem: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(out / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(out / f"{stem}-key.pem", key_pem(key), private=True)
        written.extend([out / f"{stem}.pem", out / f"{stem}-key.pem"])

    server_sans: list[x509.GeneralName] = []
    for n in server_names:
        try:
            server_sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            server_sans.append(x509.DNSName(n))
    leaf(server_names[0], server_sans, ExtendedKeyUsageOID.SERVER_AUTH, "server")
    for client_id in clients:
        leaf(client_id, [x509.DNSName(client_id)], ExtendedKeyUsageOID.CLIENT_AUTH, f"client-{client_id}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="fedmeta-certs", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the PEM files to")
    parser.add_argument("--server-names", default="localhost,127.0.0.1",
                        help="comma-separated DNS names and IP addresses the coordinator is reached at "
                             "(default: localhost,127.0.0.1)")
    parser.add_argument("--clients", default="", help="comma-separated client ids to issue certificates for")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.server_names.split(",") if n.strip()]
    if not names:
        parser.error("--server-names: expected at least one name")
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    for c in clients:
        try:
            check_client_id(c)
        except ValueError as exc:
            parser.error(f"--clients: {c!r}: {exc}")
    if args.days < 1:
        parser.error(f"--days: expected an integer >= 1, got {args.days}")
    for path in generate(args.out, server_names=names, clients=clients, days=args.days):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
