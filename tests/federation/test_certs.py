"""splitlora.federation.certs: the CA, server and client certificates `splitlora certs` writes."""
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitlora.federation.certs import (certificate_common_name, check_client_name, client_credentials_files,
                                        create_certs, server_credentials_files)


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_creates_ca_server_and_clients(tmp_path):
    written = create_certs(tmp_path, ["a,b", "c"], hosts=["fl.example.org", "10.0.0.7"], log=lambda *_: None)
    names = sorted(p.name for p in written)
    assert names == sorted(["ca.crt", "ca.key", "server.crt", "server.key"]
                           + [f"client-{n}.{e}" for n in "abc" for e in ("crt", "key")])
    for p in written:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o600 if p.suffix == ".key" else 0o644), (p, oct(mode))
    ca = _cert(tmp_path / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = _cert(tmp_path / "server.crt")
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.7"}
    for n in "abc":
        c = _cert(tmp_path / f"client-{n}.crt")
        c.verify_directly_issued_by(ca)
        assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == n
        eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
        assert certificate_common_name((tmp_path / f"client-{n}.crt").read_bytes()) == n
    assert len(server_credentials_files(tmp_path)) == 3
    assert len(client_credentials_files(tmp_path, "b")) == 3


def test_rerun_reuses_the_ca_and_never_overwrites(tmp_path):
    create_certs(tmp_path, ["a"], log=lambda *_: None)
    ca_before = (tmp_path / "ca.crt").read_bytes()
    written = create_certs(tmp_path, ["d"], log=lambda *_: None)
    assert sorted(p.name for p in written) == ["client-d.crt", "client-d.key"]
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    _cert(tmp_path / "client-d.crt").verify_directly_issued_by(_cert(tmp_path / "ca.crt"))
    with pytest.raises(ValueError, match="already exists"):
        create_certs(tmp_path, ["a"], log=lambda *_: None)


@pytest.mark.parametrize("bad", ["", "server", "a b", "-x", "x" * 65, "a/b"])
def test_bad_client_names_refused(bad):
    with pytest.raises(ValueError, match="not usable"):
        check_client_name(bad)


def test_duplicate_names_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="more than once"):
        create_certs(tmp_path / "x", ["a", "a"], log=lambda *_: None)
    with pytest.raises(ValueError, match="client-zz.key is missing"):
        create_certs(tmp_path / "y", [], log=lambda *_: None)
        client_credentials_files(tmp_path / "y", "zz")


def test_cli_certs(tmp_path, capsys):
    from splitlora.cli import main

    assert main(["certs", str(tmp_path / "c"), "--clients", "a,b,c", "--hosts", "node1"]) == 0
    out = capsys.readouterr().out
    assert "client-c.crt" in out and "ca.key" in out
    assert (tmp_path / "c" / "client-a.key").exists()
    assert main(["certs", str(tmp_path / "c"), "--clients", "a"]) == 2
    assert "already exists" in capsys.readouterr().err
