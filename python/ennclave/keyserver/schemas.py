"""Request and response bodies of the key server's HTTP API, and `Refusal`, the error
every route raises (rendered as `ErrorOut`: ``{"error": code, "reason": sentence}``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

HEX64 = r"^[0-9a-fA-F]{64}$"
KEY_ID = r"^[A-Za-z0-9._-]{1,128}$"


class Refusal(Exception):
    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


class ChallengeRequest(BaseModel):
    key_id: str = Field(pattern=KEY_ID)


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="32 random bytes, hex; single use, bound to key_id")
    expires_in: int


class EvidenceIn(BaseModel):
    kind: str = Field(max_length=32, description="software | sgx-dcap-v3")
    report: str = Field(max_length=60000, description="base64: the worker's report or SGX quote")


class ReleaseRequest(BaseModel):
    key_id: str = Field(pattern=KEY_ID)
    nonce: str = Field(pattern=HEX64)
    pubkey: str = Field(pattern=HEX64, description="the worker's ephemeral X25519 key (HELLO)")
    binary_sha256: str = Field(pattern=HEX64, description="from HELLO")
    manifest_sha256: str = Field(pattern=HEX64, description="SHA-256 of the canonical manifest")
    client_id: str = Field(
        pattern=r"^[0-9a-fA-F]{16,128}$", description="self-reported machine id hash"
    )
    evidence: EvidenceIn
    protections: str | None = Field(
        default=None,
        max_length=1024,
        description="the worker's protections (canonical JSON from its EVIDENCE, bound by "
        "the evidence hash); absent from workers before protocol 3",
    )


class ReleaseResponse(BaseModel):
    key_id: str
    enc: str = Field(description="base64, 32 B HPKE encapsulated key")
    wrapped: str = Field(description="base64, 48 B HPKE ciphertext of the data key")
    licence: str = Field(description="base64 canonical licence JSON")
    licence_mac: str = Field(description="base64 HMAC-SHA256 under a key derived from the data key")
    evidence: str
    software: bool
    expires_at: int
    query_budget: int | None = Field(
        description="this licence's slice of a metered key's budget (null: unmetered)"
    )
    budget_left: int | None = Field(
        default=None, description="what this client may still get after this slice"
    )


class UsageRequest(BaseModel):
    key_id: str = Field(pattern=KEY_ID)
    report: str = Field(max_length=1024, description="base64: the worker's usage report JSON")
    mac: str = Field(max_length=64, description="base64: its HMAC-SHA256 under the usage key")


class UsageResponse(BaseModel):
    licence_id: str
    used: int
    credited: int = Field(description="samples of the slice credited back to the budget")
    budget_left: int | None


class RegisterRequest(BaseModel):
    key_id: str = Field(pattern=KEY_ID)
    key: str = Field(max_length=64, description="base64 of the 32-byte data key")
    manifest_sha256: str | None = Field(default=None, pattern=HEX64)
    policy: dict[str, Any] = Field(default_factory=dict)


class BundleOut(BaseModel):
    key_id: str
    manifest_sha256: str | None
    policy: dict[str, Any]
    revoked: bool
    revoked_reason: str | None
    created_at: int
    updated_at: int
    clients: int
    budget_spent: int = 0
    budget_left: int | None = None


class RevokeRequest(BaseModel):
    reason: str = Field(default="revoked by the owner", max_length=200)


class AuditEntry(BaseModel):
    id: int
    ts_ms: int
    event: str
    key_id: str | None
    decision: str
    reason: str
    detail: str | None
    client_id: str | None
    peer: str | None
    evidence: str | None
    binary_sha256: str | None
    licence_id: str | None
    prev_hash: str
    hash: str


class ErrorOut(BaseModel):
    error: str
    reason: str


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorOut} for s in (400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 503)
}
