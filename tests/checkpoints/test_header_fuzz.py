"""A seeded fuzzer over a tiny model's ``model.safetensors`` header: byte-level (flip, cut, extend, length field) and
JSON-level (dtypes, shapes, offsets, keys, metadata, nesting) mutations, each run through ``attnstab info`` and, for
the ones ``info`` accepts plus a sample of the rest, ``attnstab scan``, in-process under a per-run deadline.

Every outcome must be exit 0 or exit 2 with one ``Error:`` line, never 3 and never a hang, and exit 0 only when the
mutated file is still valid per the safetensors format, as judged by :func:`is_valid_safetensors` below, written from
the format's description independently of attnstab's validator.

CI cost (about 25 s on two cores): 200 mutations through ``info`` (tens of milliseconds each); ``scan`` (about a
second each on a tiny model) runs on the first :data:`SCANS_PER_KIND` mutations of each kind that ``info`` accepts
(most accepted ones are of a few harmless kinds: padding, key order, swapped equal-size tensors) and on every
:data:`REJECTED_SCAN_EVERY`-th one it refuses (those fail at open, before any work).
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli.helpers import invoke
from hang_guard import deadline
from safetensors_bytes import split_file
from tiny_models import save_tiny_model

SEED = 20240612
N_MUTATIONS = 200
SCANS_PER_KIND = 3
REJECTED_SCAN_EVERY = 20
RUN_SECONDS = 30
SCAN = ("--calib", "random", "--seq-len", "8", "--batch-size", "1", "--batches", "1", "--quiet", "--format", "json")

# The safetensors format, from its specification: element sizes of the dtype tags this check accepts.
ELEMENT_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                 "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def is_valid_safetensors(blob: bytes) -> bool:
    """True when ``blob`` is a well-formed safetensors file: u64 little-endian header size N (at most 100 MB and
    within the file), N bytes of UTF-8 JSON beginning with ``{``, an object whose optional ``__metadata__`` maps
    strings to strings and whose other members are ``{dtype, shape, data_offsets}`` with integer shapes and offsets
    consistent with the dtype, and whose byte ranges tile the rest of the file exactly."""
    if len(blob) < 8:
        return False
    size = int.from_bytes(blob[:8], "little")
    if size > 100_000_000 or 8 + size > len(blob) or blob[8:9] != b"{":
        return False
    seen_duplicate = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            seen_duplicate.append(True)
        return dict(items)

    def no_constants(name: str) -> None:
        raise ValueError(name)

    try:
        doc = json.loads(blob[8:8 + size].decode("utf-8"), object_pairs_hook=pairs, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    if seen_duplicate or not isinstance(doc, dict):
        return False
    meta = doc.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return False

    def natural(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    spans = []
    for entry in doc.values():
        if not isinstance(entry, dict) or sorted(entry) != ["data_offsets", "dtype", "shape"]:
            return False
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ELEMENT_BYTES:
            return False
        if not isinstance(shape, list) or not all(natural(d) for d in shape):
            return False
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(natural(o) for o in offsets):
            return False
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * ELEMENT_BYTES[dtype]:
            return False
        spans.append((offsets[0], offsets[1]))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            return False
        position = end
    return position == len(blob) - 8 - size


# --- mutations: each returns the new file bytes ----------------------------------------------------------------------

Mutation = Callable[[random.Random, dict[str, Any], bytes, bytes], bytes]


def _pack(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def _tensor(rng: random.Random, h: dict[str, Any]) -> str:
    return rng.choice([k for k in h if k != "__metadata__"])


def _json(h: dict[str, Any], data: bytes) -> bytes:
    return _pack(json.dumps(h).encode(), data)


def flip_bit(rng, h, raw, data):
    b = bytearray(_pack(raw, data))
    i = rng.randrange(0, 8 + len(raw))
    b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def cut_header(rng, h, raw, data):
    cut = rng.randrange(0, len(raw))
    keep_length = rng.random() < 0.5
    return _pack(raw[:cut], data, len(raw) if keep_length else None)


def extend_header(rng, h, raw, data):
    i = rng.randrange(0, len(raw) + 1)
    junk = rng.choice([b" ", b"\x00", b",", b"{}", b"]", b'"x"', bytes(rng.randrange(256) for _ in range(8))])
    return _pack(raw[:i] + junk + raw[i:], data)


def pad_header(rng, h, raw, data):
    return _pack(raw + rng.choice([b" " * rng.randrange(1, 9), b"\n", b"\t", b"\x00"]), data)


def length_field(rng, h, raw, data):
    n = rng.choice([0, 1, 7, len(raw) - 1, len(raw) + 1, len(raw) + 8, 2**63, 2**64 - 1, 100_000_001,
                    len(raw) + len(data), len(raw) + len(data) + 1])
    return _pack(raw, data, n)


def cut_data(rng, h, raw, data):
    return _pack(raw, data[:rng.randrange(0, len(data))])


def extend_data(rng, h, raw, data):
    return _pack(raw, data + bytes(rng.randrange(1, 64)))


def change_dtype(rng, h, raw, data):
    entry = h[_tensor(rng, h)]
    entry["dtype"] = rng.choice(["F16", "BF16", "I32", "U32", "F64", "I8", "BOOL", "f32", "F33", "", ["F32"], 4,
                                 None, {"F32": 1}, "F32 "])
    if rng.random() < 0.5 and isinstance(entry["dtype"], str) and entry["dtype"] in ELEMENT_BYTES:
        entry["shape"] = [(entry["data_offsets"][1] - entry["data_offsets"][0]) // ELEMENT_BYTES[entry["dtype"]]]
    return _json(h, data)


def change_shape(rng, h, raw, data):
    entry = h[_tensor(rng, h)]
    shape = entry["shape"]
    choice = rng.randrange(10)
    if choice == 0:
        entry["shape"] = list(reversed(shape))                       # transposed, same bytes
    elif choice == 1:
        entry["shape"] = [-d for d in shape]
    elif choice == 2:
        entry["shape"] = [float(d) for d in shape]
    elif choice == 3:
        entry["shape"] = [True] + shape
    elif choice == 4:
        entry["shape"] = shape + [1]                                 # same bytes, another rank
    elif choice == 5:
        entry["shape"] = [2**64] + shape
    elif choice == 6:
        entry["shape"] = [str(d) for d in shape]
    elif choice == 7:
        entry["shape"] = [shape[0] + 1] + shape[1:]
    elif choice == 8:
        entry["shape"] = shape[:-1]
    else:
        return _pack(json.dumps(h).replace(json.dumps(shape), json.dumps(shape)[:-1] + ", 1e999]", 1).encode(),
                     data)
    return _json(h, data)


def change_offsets(rng, h, raw, data):
    name = _tensor(rng, h)
    begin, end = h[name]["data_offsets"]
    h[name]["data_offsets"] = rng.choice([
        [end, begin], [begin + 4, end + 4], [begin - 4, end - 4], [begin, end, end], [str(begin), end],
        [float(begin), float(end)], [begin], {"0": begin}, [begin, end + len(data)], [0, end - begin], None,
    ])
    return _json(h, data)


def swap_same_size(rng, h, raw, data):
    """Two tensors of equal byte size exchange offsets: still a valid file (other numbers)."""
    by_size: dict[int, list[str]] = {}
    for k, e in h.items():
        if k != "__metadata__":
            by_size.setdefault(e["data_offsets"][1] - e["data_offsets"][0], []).append(k)
    a, b = rng.sample(rng.choice([v for v in by_size.values() if len(v) > 1]), 2)
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    return _json(h, data)


def add_keys(rng, h, raw, data):
    choice = rng.randrange(5)
    name = _tensor(rng, h)
    if choice == 0:
        h[name]["extra"] = 1
    elif choice == 1:
        h["added.weight"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}      # empty, valid
    elif choice == 2:
        h["added.weight"] = {"dtype": "F32", "shape": [4], "data_offsets": [len(data), len(data) + 16]}
        return _pack(json.dumps(h).encode(), data + bytes(16))                         # valid, unread by gpt2
    elif choice == 3:
        h["added"] = rng.choice([1, "x", [], None, True])
    else:
        text = json.dumps(h)
        dup = json.dumps({name: h[name]})[1:-1]
        return _pack((text[:-1] + ", " + dup + "}").encode(), data)
    return _json(h, data)


def drop_or_rename(rng, h, raw, data):
    name = _tensor(rng, h)
    entry = h.pop(name)
    if rng.random() < 0.5:
        h[rng.choice([name + ".x", name.upper(), "", "__metadata__", name.replace(".", "/")])] = entry
    return _json(h, data)


def change_metadata(rng, h, raw, data):
    h["__metadata__"] = rng.choice([None, {}, [], "pt", 1, {"format": 1}, {"format": None}, {"a": {"b": "c"}},
                                    {"format": "pt", "extra": "yes"}, {"": ""}, {"format": ["pt"]}])
    return _json(h, data)


def nest(rng, h, raw, data):
    depth = rng.choice([1, 2, 5, 50, 1000, 100_000])
    name = _tensor(rng, h)
    field = rng.choice(["shape", "dtype", "data_offsets", None])
    inner = json.dumps(h[name][field] if field else h[name])
    wrapped = "[" * depth + inner + "]" * depth
    if field:
        text = json.dumps({k: v for k, v in h.items() if k != name})[:-1] + ", " + json.dumps(name) + ": {" + \
               ", ".join(f'"{k}": {wrapped if k == field else json.dumps(v)}' for k, v in h[name].items()) + "}}"
    else:
        text = json.dumps({k: v for k, v in h.items() if k != name})[:-1] + ", " + json.dumps(name) + ": " + \
               wrapped + "}"
    return _pack(text.encode(), data)


def reorder_keys(rng, h, raw, data):
    items = list(h.items())
    rng.shuffle(items)
    return _json(dict(items), data)


MUTATIONS: tuple[Mutation, ...] = (flip_bit, cut_header, extend_header, pad_header, length_field, cut_data,
                                   extend_data, change_dtype, change_shape, change_offsets, swap_same_size, add_keys,
                                   drop_or_rename, change_metadata, nest, reorder_keys)


def mutated_files(header: bytes, data: bytes) -> list[tuple[str, bytes]]:
    """``N_MUTATIONS`` (name, file bytes) pairs from :data:`SEED`: every mutation twice in turn, then random ones."""
    rng = random.Random(SEED)
    base = json.loads(header)
    out = []
    for i in range(N_MUTATIONS):
        mutation = MUTATIONS[i % len(MUTATIONS)] if i < 2 * len(MUTATIONS) else rng.choice(MUTATIONS)
        out.append((f"{i:03d}-{mutation.__name__}", mutation(rng, copy.deepcopy(base), header, data)))
    return out


# --- the test --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-base") / "gpt2"
    save_tiny_model("gpt2", path)
    return path


def _check_outcome(case: str, command: str, result: Any, blob: bytes) -> str:
    """``accepted`` or ``refused``; any other outcome fails the test with the case named."""
    where = f"{case}: attnstab {command}"
    assert result.exit_code in (0, 2), (where, result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stderr, (where, result.stderr)
    if result.exit_code == 2:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len([ln for ln in lines if ln.startswith("Error:")]) == 1, (where, result.stderr)
        assert all(ln.startswith(("Error:", "  hint:")) for ln in lines), (where, result.stderr)
        return "refused"
    assert is_valid_safetensors(blob), (where, "exit 0 on a header that is not valid safetensors")
    return "accepted"


def test_header_fuzz(tiny: Path, tmp_path: Path) -> None:
    header, data = split_file(tiny / "model.safetensors")
    ck = tmp_path / "ckpt"
    shutil.copytree(tiny, ck)
    outcomes: Counter[str] = Counter()
    scanned_kinds: Counter[str] = Counter()
    rejected_seen = 0
    for case, blob in mutated_files(header, data):
        (ck / "model.safetensors").write_bytes(blob)
        with deadline(RUN_SECONDS, f"{case}: attnstab info"):
            info = invoke("info", ck)
        verdict = _check_outcome(case, "info", info, blob)
        outcomes[f"info {verdict}"] += 1
        if verdict == "refused":
            rejected_seen += 1
            if rejected_seen % REJECTED_SCAN_EVERY:
                continue
        else:
            kind = case.split("-", 1)[1]
            if scanned_kinds[kind] == SCANS_PER_KIND:
                continue
            scanned_kinds[kind] += 1
        with deadline(RUN_SECONDS, f"{case}: attnstab scan"):
            scan = invoke("scan", ck, *SCAN)
        scan_verdict = _check_outcome(case, "scan", scan, blob)
        outcomes[f"scan {scan_verdict}"] += 1
        if verdict == "refused":
            assert scan_verdict == "refused", (case, "scan accepted what info refused", scan.stdout[:200])
        if scan_verdict == "accepted":
            doc = json.loads(scan.stdout)
            assert doc["manifest"]["checkpoint"]["n_layers"] == 2 and len(doc["layers"]) == 2, case
    # the fuzzer reaches both sides of the validator (it is not all noise, nor all harmless)
    assert outcomes["info accepted"] >= 10 and outcomes["info refused"] >= 100, outcomes
    assert outcomes["scan accepted"] >= 5, outcomes


def test_validity_predicate_on_known_files(tiny: Path) -> None:
    """The independent predicate agrees with the format on hand-made cases (so the fuzzer's oracle is sound)."""
    header, data = split_file(tiny / "model.safetensors")
    assert is_valid_safetensors(_pack(header, data))
    assert is_valid_safetensors(_pack(header + b"   ", data))
    assert not is_valid_safetensors(_pack(header, data + b"x"))
    assert not is_valid_safetensors(_pack(b" " + header, data))
    assert not is_valid_safetensors(_pack(header, data[:-1]))
    h = json.loads(header)
    name = _tensor(random.Random(0), h)
    h[name]["shape"] = [float(d) for d in h[name]["shape"]]
    assert not is_valid_safetensors(_json(h, data))
