"""Fuzzing the two loaders that read files from outside: configs and session states.

Whatever bytes arrive, a loader either returns or raises its documented error (ConfigError for
configs, StateError for states); any other exception is a crash a firmware caller cannot handle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import get_type_hints

import attrs
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from edge_runtime.config import RunConfig, config_to_dict, parse_config
from edge_runtime.errors import ConfigError, StateError
from edge_runtime.session import Session
from edge_runtime.state import MAGIC, decode_state, read_state
from tests.classifier_fixture import digits_session

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HEADER_START = len(MAGIC) + 8


def _field_names(section: type) -> dict[str, list[str]]:
    """Section name -> its field names, so generated configs hit real keys most of the time."""
    return {name: sorted(attrs.fields_dict(inner)) if attrs.has(inner) else []
            for name, inner in get_type_hints(section).items()}


SECTIONS = _field_names(RunConfig)
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["auto", "cpu", "cuda", "digits", "9", "ledoit_wolf", "1e-3"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3), max_leaves=8)


@st.composite
def config_trees(draw) -> dict:
    """Nested mappings shaped like a RunConfig: real section and field names, arbitrary values."""
    tree = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=6), max_size=4)):
        fields = SECTIONS.get(section, [])
        if fields and draw(st.booleans()):
            keys = st.sampled_from(fields) | st.text(max_size=6)
            tree[section] = draw(st.dictionaries(keys, VALUES, max_size=4))
        else:
            tree[section] = draw(VALUES)
    return tree


@FUZZ
@given(text=st.text(max_size=300))
def test_config_text_never_crashes(text):
    try:
        parse_config(text, origin="fuzz.yaml")
    except ConfigError as exc:
        assert "fuzz.yaml" in str(exc)


@FUZZ
@given(tree=config_trees())
def test_config_trees_never_crash(tree):
    text = yaml.safe_dump(tree, allow_unicode=True)
    try:
        config = parse_config(text, origin="fuzz.yaml")
    except ConfigError as exc:
        assert "fuzz.yaml" in str(exc)
    else:
        assert parse_config(yaml.safe_dump(config_to_dict(config))) == config


@FUZZ
@given(lines=st.lists(st.sampled_from((ROOT / "configs/digits.yaml").read_text().splitlines()), max_size=40),
       cut=st.integers(0, 400))
def test_shuffled_and_cut_real_config_lines_never_crash(lines, cut):
    try:
        parse_config("\n".join(lines)[:cut], origin="fuzz.yaml")
    except ConfigError:
        pass


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory) -> Path:
    """The bytes of a real session state: digits classifier, memory, one adapted head, a pending batch."""
    torch.set_num_threads(1)
    session, stream = digits_session({"detector.name": "grad_mahalanobis_ssl", "detector.pool_size": 80,
                                      "session.adapt_every": 80, "detector.pu_rounds": 1,
                                      "detector.pu_head.epochs": 2, "memory.budget": 40}, epochs=1)
    order = np.random.default_rng(0).permutation(len(stream))
    for start in range(0, 120, 40):
        session.observe(stream.images[order[start:start + 40]])
    assert session.rounds == 1 and session._pending
    path = tmp_path_factory.mktemp("state") / "session.state"
    session.save(path)
    return path  # a path, not the bytes: hypothesis prints fixture values of failing examples


def _rewrap(blob: bytes, payload: bytes) -> bytes:
    """`blob` with its payload replaced and the header fixed up, so the checksum no longer protects it."""
    size = int.from_bytes(blob[len(MAGIC):HEADER_START], "little")
    header = json.loads(blob[HEADER_START:HEADER_START + size])
    header.update(payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    encoded = json.dumps(header).encode()
    return MAGIC + len(encoded).to_bytes(8, "little") + encoded + payload


def _load(blob: bytes, tmp_path: Path) -> None:
    """Session.load on `blob`, accepting only success or a StateError naming the file."""
    path = tmp_path / "fuzzed.state"
    path.write_bytes(blob)
    try:
        Session.load(path)
    except StateError as exc:
        assert str(path) in str(exc)


def test_the_unmutated_state_loads(saved_state):
    assert Session.load(saved_state).rounds == 1 and read_state(saved_state)["observed"] == 120


@FUZZ
@given(data=st.data())
def test_truncated_or_flipped_state_files_raise_state_error(saved_state, tmp_path, data):
    blob = bytearray(saved_state.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[:data.draw(st.integers(0, len(blob) - 1), label="keep")]
    else:
        for position in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4, unique=True), label="flips"):
            blob[position] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(StateError, match="fuzzed.state"):
        decode_state(bytes(blob), "fuzzed.state")
    _load(bytes(blob), tmp_path)


@FUZZ
@given(data=st.data())
def test_state_header_mutations_never_crash(saved_state, tmp_path, data):
    """Edits inside the JSON header (the checksum does not cover it)."""
    saved_state = saved_state.read_bytes()
    size = int.from_bytes(saved_state[len(MAGIC):HEADER_START], "little")
    header = bytearray(saved_state[HEADER_START:HEADER_START + size])
    for position in data.draw(st.lists(st.integers(0, len(header) - 1), min_size=1, max_size=3), label="edits"):
        header[position] = data.draw(st.integers(0, 255), label="byte")
    new_size = data.draw(st.sampled_from([size, len(header)]) | st.integers(0, 2**64 - 1), label="length")
    blob = MAGIC + new_size.to_bytes(8, "little") + bytes(header) + saved_state[HEADER_START + size:]
    _load(blob, tmp_path)


@FUZZ
@given(data=st.data())
def test_payload_mutations_behind_a_valid_checksum_never_crash(saved_state, tmp_path, data):
    """What the checksum cannot catch: a payload damaged before it was hashed (or a forged file).

    Edits land mostly in the safetensors header and the JSON skeleton of the state, where they
    change structure rather than tensor values.
    """
    saved_state = saved_state.read_bytes()
    payload = bytearray(saved_state[HEADER_START + int.from_bytes(saved_state[len(MAGIC):HEADER_START], "little"):])
    header_end = 8 + int.from_bytes(payload[:8], "little")
    for position in data.draw(st.lists(st.integers(0, header_end - 1) | st.integers(0, len(payload) - 1),
                                       min_size=1, max_size=4), label="edits"):
        payload[position] = data.draw(st.sampled_from(b'{}[]":,0129-.eEnul ') | st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        payload = payload[:data.draw(st.integers(0, len(payload)), label="keep")]
    _load(_rewrap(saved_state, bytes(payload)), tmp_path)


SKELETON_EDITS = st.sampled_from([
    ("config", []), ("config", {"model": {"width": 4}}), ("known_classes", 3), ("known_classes", ["a"]),
    ("memory", "x"), ("memory", {}), ("learner", []), ("learner", {"heads": "x"}), ("observed", "many"),
    ("observed", None), ("rounds", [1]), ("pending", [[]]), ("pending", [{"features": 1}]), ("pending", 5),
    ("classifier", {}), ("classifier", {"net.weight": {"$tensor": "/nowhere"}}),
])


@FUZZ
@given(edits=st.lists(SKELETON_EDITS, min_size=1, max_size=3))
def test_well_formed_files_with_a_wrong_structure_raise_state_error(saved_state, tmp_path, edits):
    """A file that passes every byte-level check but does not hold what this runtime saves."""
    saved_state = saved_state.read_bytes()
    payload = saved_state[HEADER_START + int.from_bytes(saved_state[len(MAGIC):HEADER_START], "little"):]
    metadata = json.loads(payload[8:8 + int.from_bytes(payload[:8], "little")])["__metadata__"]
    skeleton = json.loads(metadata["skeleton"])
    for key, value in edits:
        skeleton[key] = value
    forged = save_tensors(load_tensors(payload), metadata={"skeleton": json.dumps(skeleton)})
    path = tmp_path / "fuzzed.state"
    path.write_bytes(_rewrap(saved_state, forged))
    with pytest.raises(StateError, match="fuzzed.state"):
        Session.load(path)
