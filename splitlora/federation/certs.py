"""A federation's certificates: one CA, the server's key and certificate, one per client.

`splitlora certs DIR --clients a,b,c` writes into DIR

    ca.crt, ca.key                  the federation's CA (keep ca.key off the servers and clients)
    server.crt, server.key          the server's, signed by the CA; valid for localhost, 127.0.0.1,
                                    ::1 and every --hosts name or address
    client-<name>.crt/.key          each client's, signed by the CA; its subject CN is the client's
                                    name, which is the name the server knows it by

Keys are EC P-256, written with mode 0600. Running the command again on the same DIR reuses its CA
(to add clients); a file that exists is never overwritten. Bringing your own CA: put its
certificate at DIR/ca.crt and sign server.crt and client-<name>.crt with it (CN = the client's
name; the server's certificate needs a subjectAltName for the address clients connect to).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
# A client's name travels in its certificate and names its files and checkpoints: kept to
# characters that are safe in all three.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED = ("server", "ca")


def check_client_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.lower() in _RESERVED:
        raise ValueError(f"client name {name!r} is not usable: a name is 1 to 64 letters, digits, '_', '.' or '-', "
                         f"starting with a letter or digit, and not one of {', '.join(_RESERVED)}")
    return name


def client_files(name: str):
    return f"client-{name}.crt", f"client-{name}.key"


def _write_private(path: Path, data: bytes) -> None:
    # Created with 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # an umask cannot widen it, but an odd filesystem might have


def _write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitlora federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject, issuer, public_key, days: int):
    from cryptography import x509

    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            # An hour of slack for clocks that are a little behind the one that signed.
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _make_ca(days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _new_key()
    name = _name("splitlora federation CA")
    cert = (_builder(name, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _load_ca(directory: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{directory}: {CA_CERT} and {CA_KEY} exist but cannot be read as an unencrypted PEM "
                         f"certificate and key ({err}); remove them to make a new CA, or use another DIR") from None
    return key, cert


def _sign(ca_key, ca_cert, common_name: str, *, server_hosts: Optional[Sequence[str]], days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    b = (_builder(_name(common_name), ca_cert.subject, key.public_key(), days)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                      crl_sign=False, content_commitment=False, data_encipherment=False,
                                      key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server_hosts is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        b = b.add_extension(x509.SubjectAlternativeName([_san(h) for h in server_hosts]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _split_names(values: Iterable[str]) -> List[str]:
    out: List[str] = []
    for v in values:
        out.extend(x.strip() for x in str(v).split(",") if x.strip())
    return out


def create_certs(directory, clients: Iterable[str], *, hosts: Iterable[str] = (), days: int = 365,
                 log=print) -> List[Path]:
    """Writes (or completes) a federation's certificates in `directory`; returns the files written."""
    directory = Path(directory)
    names = _split_names(clients)
    for name in names:
        check_client_name(name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--clients names {', '.join(duplicates)} more than once; every client needs its own name")
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"--days must be a whole number of days >= 1, got {days!r}")
    extra_hosts = _split_names(hosts)
    for h in extra_hosts:
        if not re.match(r"^[A-Za-z0-9_.:*-]+$", h):
            raise ValueError(f"--hosts: {h!r} is neither a host name nor an IP address")
    directory.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    have_cert, have_key = (directory / CA_CERT).exists(), (directory / CA_KEY).exists()
    if have_cert and have_key:
        ca_key, ca_cert = _load_ca(directory)
        log(f"certs: reusing the CA in {directory}")
    elif have_cert or have_key:
        raise ValueError(f"{directory} holds only one of {CA_CERT} and {CA_KEY}; both are needed to sign "
                         f"certificates (with your own CA, sign the certificates yourself: see the README)")
    else:
        ca_key, ca_cert = _make_ca(days)
        _write_private(directory / CA_KEY, _key_pem(ca_key))
        _write_public(directory / CA_CERT, _cert_pem(ca_cert))
        written += [directory / CA_KEY, directory / CA_CERT]
    targets = [(SERVER_CERT, SERVER_KEY, "server", list(dict.fromkeys([*DEFAULT_HOSTS, *extra_hosts])))]
    targets += [(*client_files(n), n, None) for n in names]
    for cert_file, key_file, cn, server_hosts in targets:
        if (directory / cert_file).exists() or (directory / key_file).exists():
            if server_hosts is not None:
                if extra_hosts:
                    log(f"certs: {directory / cert_file} exists and is kept; --hosts applies to a new one only "
                        f"(remove server.crt and server.key to make it again)")
                continue
            raise ValueError(f"{directory / cert_file} already exists; a client's certificate is never replaced "
                             f"(remove {cert_file} and {key_file} first to issue a new one)")
        key, cert = _sign(ca_key, ca_cert, cn, server_hosts=server_hosts, days=days)
        _write_private(directory / key_file, _key_pem(key))
        _write_public(directory / cert_file, _cert_pem(cert))
        written += [directory / key_file, directory / cert_file]
    return written


# --- reading them back for gRPC ------------------------------------------------------------------

def _read(directory: Path, name: str, what: str) -> bytes:
    path = Path(directory) / name
    if not path.is_file():
        raise ValueError(f"--certs {directory}: {name} is missing ({what}); create the files with "
                         f"`splitlora certs {directory} --clients ...` or see the README for your own CA")
    return path.read_bytes()


def server_credentials_files(directory) -> tuple:
    """(CA certificate, server key, server certificate) as PEM bytes."""
    return (_read(directory, CA_CERT, "the CA certificate that signs the clients'"),
            _read(directory, SERVER_KEY, "the server's private key"),
            _read(directory, SERVER_CERT, "the server's certificate"))


def client_credentials_files(directory, name: str) -> tuple:
    """(CA certificate, client key, client certificate) as PEM bytes."""
    cert_file, key_file = client_files(check_client_name(name))
    return (_read(directory, CA_CERT, "the CA certificate that signs the server's"),
            _read(directory, key_file, f"client {name}'s private key"),
            _read(directory, cert_file, f"client {name}'s certificate"))


def certificate_common_name(pem: bytes) -> str:
    """The subject CN of a PEM certificate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError("the certificate has no subject common name (CN), which names a federation client")
    return str(names[0].value)
