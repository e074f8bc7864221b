"""The session state file: exact round trip, and every kind of bad file refused with the file named."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from edge_runtime.continual.memory import RehearsalMemory
from edge_runtime.errors import InputError, StateError
from edge_runtime.state import (
    FORMAT_VERSION,
    MAGIC,
    decode_state,
    encode_state,
    read_state,
    write_state,
)


@pytest.fixture
def memory_state(digits_train):
    """A real memory's state (images, embeddings-free) plus nested values of every stored kind."""
    memory = RehearsalMemory(50, "class_balanced", digits_train.images.shape[1:], seed=3)
    memory.add(digits_train.images[:200], digits_train.labels[:200])
    return {"memory": memory.state_dict(), "names": ["0", "1"], "threshold": 0.25, "nothing": None,
            "heads": [{"weights": {"fc.weight": torch.arange(6.0).view(2, 3)}, "flag": True}]}


def test_round_trip_restores_tensors_values_and_memory(memory_state, tmp_path, digits_train):
    path = tmp_path / "session.state"
    size = write_state(path, memory_state)
    assert size == path.stat().st_size
    restored = read_state(path)
    assert restored["names"] == ["0", "1"] and restored["threshold"] == 0.25 and restored["nothing"] is None
    assert torch.equal(restored["heads"][0]["weights"]["fc.weight"], torch.arange(6.0).view(2, 3))
    assert restored["heads"][0]["flag"] is True
    original = RehearsalMemory.from_state(memory_state["memory"])
    memory = RehearsalMemory.from_state(restored["memory"])
    assert np.array_equal(memory.images, original.images) and np.array_equal(memory.labels, original.labels)
    # The policy's random state travels too: both evict the same samples from here on.
    for m in (memory, original):
        m.add(digits_train.images[200:400], digits_train.labels[200:400])
    assert np.array_equal(memory.images, original.images) and memory.seen == original.seen == 400


def _rewrite_header(blob: bytes, **changes) -> bytes:
    """The same file with header fields changed (and the length field kept consistent)."""
    start = len(MAGIC) + 8
    length = int.from_bytes(blob[len(MAGIC):start], "little")
    header = json.loads(blob[start:start + length]) | changes
    encoded = json.dumps(header).encode()
    return MAGIC + len(encoded).to_bytes(8, "little") + encoded + blob[start + length:]


@pytest.mark.parametrize("damage, message", [
    (lambda blob: blob[: len(blob) - 100], "truncated"),
    (lambda blob: blob[:30], "truncated"),
    (lambda blob: b"", "not an edge_runtime session state"),
    (lambda blob: blob[:-5] + bytes([blob[-5] ^ 0xFF]) + blob[-4:], "corrupt"),
    (lambda blob: b"PK\x03\x04" + blob[4:], "not an edge_runtime session state"),
    (lambda blob: _rewrite_header(blob, version=FORMAT_VERSION + 1), "version"),
    (lambda blob: _rewrite_header(blob, format="edge_runtime.classifier"), "format"),
    (lambda blob: blob[: len(MAGIC) + 8] + b"{not json" + blob[len(MAGIC) + 17:], "corrupt"),
])
def test_bad_files_are_refused_naming_the_file(memory_state, tmp_path, damage, message):
    path = tmp_path / "damaged.state"
    path.write_bytes(damage(encode_state(memory_state)))
    with pytest.raises(StateError, match=message) as refused:
        read_state(path)
    assert str(path) in str(refused.value)


def test_a_payload_that_matches_a_forged_checksum_still_has_to_parse(memory_state):
    blob = encode_state(memory_state)
    start = len(MAGIC) + 8
    length = int.from_bytes(blob[len(MAGIC):start], "little")
    junk = b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14
    forged = _rewrite_header(blob[:start + length], payload_bytes=len(junk),
                             payload_sha256=hashlib.sha256(junk).hexdigest()) + junk
    with pytest.raises(StateError, match="cannot be read"):
        decode_state(forged, "forged.state")


def test_missing_file_and_unstorable_values(tmp_path):
    with pytest.raises(StateError, match="cannot read session state"):
        read_state(tmp_path / "absent.state")
    with pytest.raises(TypeError, match="/bad"):
        encode_state({"bad": object()})
    with pytest.raises(ValueError):
        encode_state({"score": float("nan")})  # JSON has no NaN; a state must not hide one


def test_memory_of_embeddings_only_round_trips_and_refuses_rows_it_does_not_store(digits_train):
    pixels = digits_train.images[:80].reshape(80, -1).astype(np.float32)  # stand-in "features": real digit pixels
    memory = RehearsalMemory(40, "reservoir", None, seed=1, embedding_dims=(64, 10))
    memory.add(None, digits_train.labels[:80], pixels, np.eye(10, dtype=np.float32)[digits_train.labels[:80]])
    restored = RehearsalMemory.from_state(decode_state(encode_state(memory.state_dict()), "memory"))
    assert restored.images is None and np.array_equal(restored.features, memory.features)
    assert torch.equal(restored.observations().logits.argmax(dim=1), restored.stored_labels())
    with pytest.raises(InputError, match="does not store images"):
        memory.add(digits_train.images[:2], digits_train.labels[:2], pixels[:2], pixels[:2, :10])
    with pytest.raises(InputError, match=r"features must be \[2, 64\]"):
        memory.add(None, digits_train.labels[:2], pixels[:2, :10], pixels[:2, :10])
    assert memory.seen == 80  # a refused offer changes nothing
