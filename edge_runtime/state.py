"""The session state file: one self-checking file holding everything a session needs to resume.

Layout: MAGIC, an 8-byte little-endian header length, a JSON header, then the payload.
- header: {"format", "version", "payload_bytes", "payload_sha256"}
- payload: safetensors bytes of every tensor, with the JSON skeleton of the state (config, class
  names, counters, the nested structure that tells where each tensor goes) in its metadata.
The checksum covers the whole payload and every header field is checked, so a truncated, corrupt,
foreign or other-version file is refused with a StateError naming the file. Writes go through
`write_bytes_atomic`, so an interrupted save leaves the previous file as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from edge_runtime.atomic import write_bytes_atomic
from edge_runtime.errors import StateError

MAGIC = b"EDGE_RUNTIME_STATE\n"
FORMAT = "edge_runtime.session"
FORMAT_VERSION = 1
_LENGTH_BYTES = 8
_MAX_HEADER_BYTES = 4096
_TENSOR_REF = "$tensor"  # marks, in the skeleton, where a tensor of the payload goes


def encode_state(state: dict[str, Any]) -> bytes:
    """Serialise a nested state (dicts, lists, JSON values and tensors) into the file's bytes."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, "", tensors)
    payload = save_tensors(tensors, metadata={"skeleton": json.dumps(skeleton, allow_nan=False)})
    header = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "payload_bytes": len(payload),
                         "payload_sha256": hashlib.sha256(payload).hexdigest()}).encode("utf-8")
    return MAGIC + len(header).to_bytes(_LENGTH_BYTES, "little") + header + payload


def decode_state(blob: bytes, origin: str) -> dict[str, Any]:
    """The nested state back from `encode_state`'s bytes; `origin` names the file in errors."""
    if not blob.startswith(MAGIC):
        raise StateError(f"{origin} is not an edge_runtime session state (it does not start with {MAGIC!r})")
    start = len(MAGIC) + _LENGTH_BYTES
    header_bytes = int.from_bytes(blob[len(MAGIC):start], "little")
    if len(blob) < start or not 0 < header_bytes <= _MAX_HEADER_BYTES or len(blob) < start + header_bytes:
        raise StateError(f"{origin} is truncated or corrupt: its header length field is unusable")
    try:
        header = json.loads(blob[start:start + header_bytes])
        kind, version = header["format"], header["version"]
        expected_bytes, expected_sha = int(header["payload_bytes"]), str(header["payload_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{origin} is corrupt: unreadable header ({exc})") from None
    if kind != FORMAT:
        raise StateError(f"{origin} holds format {kind!r}, not {FORMAT!r}")
    if version != FORMAT_VERSION:
        raise StateError(f"{origin} has session state version {version!r}; this runtime reads version {FORMAT_VERSION}")
    payload = blob[start + header_bytes:]
    if len(payload) != expected_bytes:
        raise StateError(f"{origin} is truncated or padded: its payload holds {len(payload)} bytes, "
                         f"the header says {expected_bytes}")
    if hashlib.sha256(payload).hexdigest() != expected_sha:
        raise StateError(f"{origin} is corrupt: the payload's sha256 does not match the header")
    try:
        tensors = load_tensors(payload)
        skeleton = json.loads(_payload_metadata(payload)["skeleton"])
    except (SafetensorError, ValueError, KeyError) as exc:
        raise StateError(f"{origin}: payload passes its checksum but cannot be read ({exc})") from None
    return _join_tensors(skeleton, tensors, origin)


def write_state(path: str | os.PathLike, state: dict[str, Any]) -> int:
    """Write the state atomically (temp file, fsync, rename); returns the file's size in bytes."""
    blob = encode_state(state)
    write_bytes_atomic(path, blob)
    return len(blob)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            blob = handle.read()
    except OSError as exc:
        raise StateError(f"cannot read session state {path}: {exc.strerror or exc}") from None
    return decode_state(blob, str(path))


def _split_tensors(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON skeleton of `node`, moving each tensor into `tensors` under its path."""
    if isinstance(node, torch.Tensor):
        tensors[path] = node.detach().cpu().contiguous().clone()
        return {_TENSOR_REF: path}
    if isinstance(node, dict):
        if _TENSOR_REF in node or not all(isinstance(key, str) for key in node):
            raise TypeError(f"state at {path or '/'}: keys must be strings other than {_TENSOR_REF!r}")
        return {key: _split_tensors(value, f"{path}/{key}", tensors) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_split_tensors(value, f"{path}/{index}", tensors) for index, value in enumerate(node)]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"state at {path or '/'}: cannot store a {type(node).__name__}")


def _join_tensors(node: Any, tensors: dict[str, torch.Tensor], origin: str) -> Any:
    if isinstance(node, dict):
        if set(node) == {_TENSOR_REF}:
            try:
                return tensors[node[_TENSOR_REF]]
            except KeyError:
                raise StateError(f"{origin}: tensor {node[_TENSOR_REF]!r} is missing from the payload") from None
        return {key: _join_tensors(value, tensors, origin) for key, value in node.items()}
    if isinstance(node, list):
        return [_join_tensors(value, tensors, origin) for value in node]
    return node


def _payload_metadata(payload: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ block."""
    size = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + size])["__metadata__"]
