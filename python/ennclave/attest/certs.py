"""Certificates, chains, CRLs and the pinned vendor roots.

Every signature check is `cryptography`'s: `Certificate.verify_directly_issued_by`
(RSA-PSS for AMD, ECDSA for Intel), `CertificateRevocationList.is_signature_valid`,
and `EllipticCurvePublicKey.verify` for the raw r‖s signatures vendors put in their
evidence. The roots are package data (`roots/`), pinned per vendor and product;
`intermediates/` holds the vendor intermediates (AMD ASK/ASVK, Intel TCB Signing) so
that an operator need not supply them — they are checked against the root every time.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from . import der
from .errors import EvidenceRefused

PEM_CERT = b"-----BEGIN CERTIFICATE-----"
PEM_CRL = b"-----BEGIN X509 CRL-----"
SNP_PRODUCTS = ("Milan", "Genoa")
T = TypeVar("T")


def _quiet_load(fn: Callable[[bytes], T], data: bytes) -> T:
    # AMD issues VCEK/VLEK certificates with serial number 0, which RFC 5280 forbids;
    # cryptography still loads them but warns. They are AMD's real certificates.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return fn(data)


def load_certificates(data: bytes, what: str = "certificate data") -> list[x509.Certificate]:
    """All certificates in `data`: PEM (one or more) or DER (one or several, back to back)."""
    try:
        if PEM_CERT in data:
            return list(_quiet_load(x509.load_pem_x509_certificates, data))
        out, off = [], 0
        while off < len(data):
            tlv_len = _der_len(data, off)
            out.append(_quiet_load(x509.load_der_x509_certificate, data[off : off + tlv_len]))
            off += tlv_len
        if not out:
            raise ValueError("empty")
        return out
    except (ValueError, der.DerError):
        raise EvidenceRefused("bad_certificate", f"The {what} is not valid X.509.") from None


def _der_len(data: bytes, off: int) -> int:
    """Total length of the DER value starting at `off` (header included)."""
    if off + 2 > len(data) or data[off] != der.SEQUENCE:
        raise ValueError("not a DER certificate")
    first = data[off + 1]
    if first < 0x80:
        return 2 + first
    n = first & 0x7F
    if not 1 <= n <= 4 or off + 2 + n > len(data):
        raise ValueError("bad DER length")
    return 2 + n + int.from_bytes(data[off + 2 : off + 2 + n], "big")


def load_crl(data: bytes, what: str = "CRL") -> x509.CertificateRevocationList:
    try:
        if PEM_CRL in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise EvidenceRefused("bad_collateral", f"The {what} is not a valid X.509 CRL.") from None


def _package_certs(folder: str, name: str) -> list[x509.Certificate]:
    data = resources.files(__package__).joinpath(folder, name).read_bytes()
    return load_certificates(data, f"packaged {name}")


@dataclass(frozen=True)
class Anchors:
    """The trust anchors: Intel's SGX Root CA (SGX and TDX) and AMD's ARK per product.
    `pinned()` gives the vendors' roots shipped with ennclave; tests build their own."""

    intel_root: x509.Certificate
    amd_arks: Mapping[str, x509.Certificate]

    @staticmethod
    @functools.cache
    def pinned() -> Anchors:
        [intel] = _package_certs("roots", "intel-sgx-root-ca.pem")
        arks = {p: _package_certs("roots", f"amd-ark-{p.lower()}.pem")[0] for p in SNP_PRODUCTS}
        return Anchors(intel, arks)


@functools.cache
def packaged_intermediate(name: str) -> x509.Certificate | None:
    """A vendor intermediate shipped in `intermediates/` (None if not shipped)."""
    try:
        return _package_certs("intermediates", name)[0]
    except FileNotFoundError:
        return None


def cn(cert: x509.Certificate | x509.Name) -> str:
    name = cert if isinstance(cert, x509.Name) else cert.subject
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()


def der_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def when(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def order_chain(certs: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Leaf first, each followed by its issuer (by name); certs outside the path dropped."""
    subjects = {c.subject for c in certs}
    issuers = {c.issuer for c in certs if c.issuer != c.subject}
    leaves = [c for c in certs if c.subject not in issuers]
    if not leaves:
        return list(certs)
    chain = [leaves[0]]
    while chain[-1].issuer != chain[-1].subject and chain[-1].issuer in subjects:
        nxt = next(c for c in certs if c.subject == chain[-1].issuer)
        if nxt in chain:
            break
        chain.append(nxt)
    return chain


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    if child is not parent:
        try:
            bc = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = bc.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise EvidenceRefused(
                "bad_chain",
                f"The {cn(parent)} certificate is not a CA, so it cannot issue {cn(child)}.",
            )
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise EvidenceRefused(
            "bad_chain", f"The {cn(child)} certificate is not signed by {cn(parent)}."
        ) from None


def verify_chain(
    chain: Sequence[x509.Certificate], root: x509.Certificate, at: datetime
) -> list[x509.Certificate]:
    """Check that `chain` (leaf first; it may end with the root) leads to the pinned
    `root` and that every certificate is valid at `at`. Returns the full path, root last."""
    path = list(chain)
    if not path:
        raise EvidenceRefused("collateral_missing", "No certificate chain was given.")
    if path[-1].subject == path[-1].issuer:  # the evidence brought its own root
        if der_bytes(path[-1]) != der_bytes(root):
            raise EvidenceRefused(
                "untrusted_root",
                f"The chain ends at a {cn(path[-1])} certificate that is not the pinned {cn(root)}.",
            )
        path = path[:-1]
    path.append(root)
    # Signatures first, then validity: a changed byte is a forgery before it is a date.
    for child, parent in itertools.pairwise(path):
        _issued_by(child, parent)
    _issued_by(root, root)
    for c in path:
        if not c.not_valid_before_utc <= at <= c.not_valid_after_utc:
            raise EvidenceRefused(
                "cert_expired",
                f"The {cn(c)} certificate is valid from {when(c.not_valid_before_utc)} to "
                f"{when(c.not_valid_after_utc)}, not at {when(at)}.",
            )
    return path


def check_crl(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    subject: x509.Certificate,
    at: datetime,
) -> str | None:
    """Check `crl` is `issuer`'s and that it does not list `subject`. Returns a note when
    the CRL is stale at `at` (a policy decision), None when fresh."""
    if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise EvidenceRefused(
            "bad_collateral", f"The CRL for {cn(crl.issuer)} is not signed by {cn(issuer)}."
        )
    if crl.get_revoked_certificate_by_serial_number(subject.serial_number) is not None:
        raise EvidenceRefused(
            "cert_revoked", f"{cn(issuer)} has revoked the {cn(subject)} certificate."
        )
    nxt = crl.next_update_utc
    if crl.last_update_utc > at:
        raise EvidenceRefused(
            "bad_collateral",
            f"The CRL of {cn(issuer)} was issued at {when(crl.last_update_utc)}, after the "
            f"verification time {when(at)}.",
        )
    if nxt is not None and at > nxt:
        return f"the CRL of {cn(issuer)} (next update {when(nxt)})"
    return None


def ecdsa_verify(
    pub: ec.EllipticCurvePublicKey, r: int, s: int, data: bytes, h: hashes.HashAlgorithm
) -> bool:
    """`cryptography`'s ECDSA check of a signature the vendor gave as raw (r, s)."""
    try:
        pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(h))
        return True
    except InvalidSignature:
        return False


def p256_key(xy: bytes, what: str) -> ec.EllipticCurvePublicKey:
    """A P-256 key given as raw x‖y (64 bytes), as DCAP quotes carry it."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + xy)
    except ValueError:
        raise EvidenceRefused("bad_signature", f"The {what} is not a P-256 point.") from None


def ec_key(cert: x509.Certificate, curve: type[ec.EllipticCurve]) -> ec.EllipticCurvePublicKey:
    k = cert.public_key()
    if not isinstance(k, ec.EllipticCurvePublicKey) or not isinstance(k.curve, curve):
        raise EvidenceRefused(
            "bad_certificate", f"The {cn(cert)} certificate's key is not {curve.name}."
        )
    return k


def extension_value(cert: x509.Certificate, dotted: str) -> bytes | None:
    """The raw DER value of a private (unrecognised) extension, or None."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(dotted))
    except x509.ExtensionNotFound:
        return None
    v = ext.value
    return v.value if isinstance(v, x509.UnrecognizedExtension) else None


def find(certs: Iterable[x509.Certificate], common_name: str) -> x509.Certificate | None:
    return next((c for c in certs if cn(c) == common_name), None)
