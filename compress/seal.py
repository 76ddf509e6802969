"""Seals: what makes a manifest, the files it lists and a report tamper-evident.

An artifact's `manifest.json` lists every file of the artifact with its sha256 and size and,
once the gate has judged it, the verdict (the report files are then listed too, so the
decision data in `report.json` is covered by the same hashes as the weights). The manifest
carries a `seal`: the sha256 of its own canonical JSON (every field but `seal`, keys sorted,
no whitespace), so an edit of any manifest field (`dtype`, `source`, `stages`, `verdict`, a
file's hash) is detected. A report carries a seal of its own the same way, which
`compress gate --replay` checks, so a report outside an artifact is covered too.

What a seal protects against: accidental corruption, truncated copies, and hand edits of any
sealed file or field. What it does not: someone who edits a file *and* recomputes the hashes
and the seal (the algorithm is public). For that, a pipeline signs the manifest with a key it
keeps (`--sign-key` / `compress sign`): `manifest.sig` holds an HMAC-SHA256 of the manifest's
bytes, which `compress verify --key` checks; whoever lacks the key cannot produce it. (A
pipeline that wants public-key provenance signs `manifest.json` with Sigstore instead: the
manifest covers everything, so a signature over it covers the artifact.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)

from compress.errors import ArtifactError, BadInputError
from compress.fileio import atomic_write_json

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT_VERSION = 2  # 2: the manifest is sealed; 1 (unsealed) is refused
SEAL_ALGORITHM = "sha256-canonical-json"
SIGNATURE_ALGORITHM = "hmac-sha256"
RESERVED_FIELDS = ("format_version", "files", "seal")
MIN_KEY_BYTES = 32
MAX_MANIFEST_BYTES = 16 << 20  # a manifest lists files: megabytes would be a mistake or an attack

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _plain_file_name(name: str) -> str:
    """What a manifest lists must stay inside the artifact's directory."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
        raise ValueError(f"{name!r} is not a plain file name")
    return name


FileName = Annotated[str, Field(max_length=255), AfterValidator(_plain_file_name)]


class _Sealed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FileEntry(_Sealed):
    sha256: Sha256Hex
    bytes: int = Field(ge=0)


class Seal(_Sealed):
    algorithm: Literal["sha256-canonical-json"]
    sha256: Sha256Hex


class VerdictRecord(BaseModel):
    """The gate's decision, sealed with the weights (report.json, listed in `files`, holds
    the per-item and per-window data it was made from)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    verdict: Literal["ship", "reject", "inconclusive"]
    exit_code: StrictInt
    report: FileName


class ManifestSchema(BaseModel):
    """The fields every reader relies on; other fields (source, stages, export) pass through,
    sealed like the rest."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    format_version: StrictInt
    files: dict[FileName, FileEntry]
    seal: Seal
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    verdict: VerdictRecord | None = None

    @field_validator("format_version")
    @classmethod
    def _current(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(
                f"format {value}; this compress reads format {FORMAT_VERSION} (sealed "
                "manifests): an artifact from an older compress cannot be verified, re-run "
                "its recipe"
            )
        return value

    @field_validator("files")
    @classmethod
    def _not_itself(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        if MANIFEST in files or SIGNATURE in files:
            raise ValueError(f"lists {MANIFEST} or {SIGNATURE}, which cannot seal themselves")
        return files


# --------------------------------------------------------------------------- digests


def canonical_digest(data: dict[str, Any]) -> str:
    """sha256 of `data` as canonical JSON: keys sorted, no whitespace, UTF-8."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _as_stored(data: dict[str, Any]) -> dict[str, Any]:
    """`data` as it reads back from JSON (tuples → lists, keys → strings), so the digest of
    what is written equals the digest of what is read."""
    return json.loads(json.dumps(data))


def sealed(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with a `seal` over every other field."""
    body = _as_stored({k: v for k, v in data.items() if k != "seal"})
    return {**body, "seal": {"algorithm": SEAL_ALGORITHM, "sha256": canonical_digest(body)}}


def seal_matches(data: dict[str, Any]) -> bool:
    seal = data.get("seal")
    if not isinstance(seal, dict) or seal.get("algorithm") != SEAL_ALGORITHM:
        return False
    body = {k: v for k, v in data.items() if k != "seal"}
    return hmac.compare_digest(str(seal.get("sha256")), canonical_digest(body))


# --------------------------------------------------------------------------- manifests


def _field_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<top level>'}: {err['msg']}"
        for err in exc.errors()
    )


def read_json_file(path: Path, *, limit: int = MAX_MANIFEST_BYTES) -> Any:
    """A JSON file's content; ArtifactError naming the file when it is too large, not UTF-8 or
    not JSON."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise ArtifactError(f"{path}: {size:,} bytes, over the {limit:,}-byte limit")
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path}: not valid JSON: {exc}") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror or exc}") from None


def check_manifest(data: Any, where: Path) -> dict[str, Any]:
    """A parsed manifest, validated (the fields readers rely on) and its seal checked."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: a manifest must be a JSON object, got {type(data).__name__}")
    try:
        ManifestSchema.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(f"{where}: invalid manifest: {_field_errors(exc)}") from None
    if not seal_matches(data):
        raise ArtifactError(
            f"{where}: the manifest's seal does not match its fields: a field was edited after "
            "the artifact was sealed"
        )
    return data


def write_manifest(directory: Path, fields: dict[str, Any], files: dict[str, Any]) -> dict:
    """Seal `fields` + `files` and write them as the directory's manifest (atomically)."""
    body = {k: v for k, v in fields.items() if k not in RESERVED_FIELDS}
    manifest = sealed({"format_version": FORMAT_VERSION, **body, "files": files})
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------- reports


def check_report_seal(report: dict[str, Any], where: Path) -> None:
    """A report read for replay must carry its seal, and the seal must match."""
    if "seal" not in report:
        raise BadInputError(
            f"{where}: the report has no seal, so its decision data cannot be trusted "
            "(reports are sealed since manifest format 2: re-run the gate)"
        )
    if not seal_matches(report):
        raise BadInputError(
            f"{where}: the report's seal does not match its content: it was edited after the "
            "gate wrote it"
        )


# --------------------------------------------------------------------------- signatures


def read_key(path: Path, option: str = "--key") -> bytes:
    """A signing key: the bytes of a file the pipeline keeps secret (at least 32 of them)."""
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise BadInputError(f"{option} {path}: cannot read: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise BadInputError(
            f"{option} {path}: {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} "
            "(e.g. `openssl rand -hex 32 > key`)"
        )
    return key


def key_id(key: bytes) -> str:
    """Which key signed: a short digest that tells keys apart without revealing them."""
    return hashlib.sha256(b"compress-key-id\0" + key).hexdigest()[:16]


def _mac(key: bytes, manifest_bytes: bytes) -> str:
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def sign_manifest(directory: Path, key: bytes) -> dict[str, str]:
    """Write `manifest.sig`: an HMAC-SHA256 over the manifest's exact bytes."""
    manifest_bytes = (directory / MANIFEST).read_bytes()
    signature = {
        "algorithm": SIGNATURE_ALGORITHM,
        "key_id": key_id(key),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": _mac(key, manifest_bytes),
    }
    atomic_write_json(directory / SIGNATURE, signature)
    return signature


def check_signature(directory: Path, key: bytes) -> None:
    """ArtifactError unless `manifest.sig` is a signature of this manifest by `key`."""
    path = directory / SIGNATURE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {SIGNATURE}: the artifact is not signed")
    signature = read_json_file(path, limit=1 << 16)
    if not isinstance(signature, dict) or signature.get("algorithm") != SIGNATURE_ALGORITHM:
        raise ArtifactError(f"{path}: not a {SIGNATURE_ALGORITHM} signature")
    if signature.get("key_id") != key_id(key):
        raise ArtifactError(
            f"{path}: signed with another key (key id {signature.get('key_id')!r}, the given "
            f"key's is {key_id(key)!r})"
        )
    expected = _mac(key, (directory / MANIFEST).read_bytes())
    if not hmac.compare_digest(str(signature.get("signature")), expected):
        raise ArtifactError(f"{path}: the signature does not match the manifest")
