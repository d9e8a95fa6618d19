"""One safetensors header validator: ``info`` and ``scan`` refuse the same broken headers with exit 2 and one line
naming the file (types, tiling of the data section, trailing bytes, metadata, nesting)."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cli.helpers import assert_input_error, invoke
from hang_guard import deadline
from safetensors_bytes import join_file, split_file

SCAN = ("--calib", "random", "--seq-len", "8", "--batch-size", "1", "--batches", "1", "--quiet")
WTE = "transformer.wte.weight"              # shape [97, 64], F32
BIAS = "transformer.h.0.attn.c_attn.bias"   # shape [192], F32, the first tensor in the data section



def _entry(key: str, value: object) -> Callable[[dict], None]:
    def mutate(h: dict) -> None:
        h[WTE][key] = value
    return mutate


def _shift_offsets(h: dict, by: int) -> None:
    for name, entry in h.items():
        if name != "__metadata__":
            entry["data_offsets"] = [o + by for o in entry["data_offsets"]]


def _overlap(h: dict) -> None:
    """The first tensor's bytes claimed by a second, same-sized tensor."""
    h["copy.bias"] = dict(h[BIAS])


def _as_text(h: dict) -> bytes:
    return json.dumps(h).encode()


# (header mutation as a dict edit, or raw bytes from the header text; extra data bytes; needle in the error)
CASES: dict[str, tuple[Callable[[dict], None] | Callable[[bytes], bytes], bytes, str]] = {
    "negative shape": (_entry("shape", [-97, -64]), b"", "non-negative integers"),
    "float shape": (_entry("shape", [97.0, 64]), b"", "non-negative integers"),
    "bool shape": (_entry("shape", [True, 6208]), b"", "non-negative integers"),
    "infinite shape": (lambda raw: raw.replace(b"[97, 64]", b"[1e400, 64]"), b"", "non-negative integers"),
    "NaN shape": (lambda raw: raw.replace(b"[97, 64]", b"[NaN, 64]"), b"", "NaN is not JSON"),
    "huge shape": (_entry("shape", [2**70, 2**70]), b"", "does not match shape"),
    "dtype list": (_entry("dtype", ["F32"]), b"", "not a string"),
    "dtype unknown": (_entry("dtype", "F33"), b"", "unknown dtype 'F33'"),
    "string offsets": (lambda h: h[BIAS].update(data_offsets=["0", "768"]), b"", "two non-negative integers"),
    "three offsets": (lambda h: h[BIAS].update(data_offsets=[0, 768, 768]), b"", "two non-negative integers"),
    "overlapping offsets": (_overlap, b"", "overlap"),
    "gapped offsets": (lambda h: _shift_offsets(h, 16), bytes(16), "belong to no tensor"),
    "extra entry key": (_entry("offsets", [0, 1]), b"", "has keys"),
    "entry not an object": (lambda h: h.update(extra=[1, 2]), b"", "is not an object"),
    "duplicate names": (lambda raw: raw[:-1] + b', "' + BIAS.encode() + b'": {"dtype": "F32", "shape": [192], '
                        b'"data_offsets": [0, 768]}}', b"", "duplicate key"),
    "trailing junk": (lambda h: None, b"junk after the last tensor", "trailing data"),
    "metadata not an object": (lambda h: h.update(__metadata__=["pt"]), b"", "__metadata__"),
    "metadata value not a string": (lambda h: h.update(__metadata__={"format": 1}), b"", "__metadata__"),
    "deep nesting": (lambda raw: b'{"__metadata__": {"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}, " + raw[1:],
                     b"", "nested"),
    "not UTF-8": (lambda raw: raw.replace(b'"pt"', b'"\xff\xfe"'), b"", "not UTF-8"),
    "array header": (lambda raw: b"[" + raw + b"]", b"", "does not begin with '{'"),
}


def _write_case(ck: Path, case: str) -> None:
    mutate, extra, _ = CASES[case]
    header, data = split_file(ck / "model.safetensors")
    try:
        h = json.loads(header)
        mutate(h)                                   # a dict edit
        header = _as_text(h)
    except (TypeError, AttributeError):
        header = mutate(json.dumps(json.loads(header)).encode())   # a raw-bytes edit on the plain JSON text
    join_file(ck / "model.safetensors", header, data + extra)


@pytest.mark.parametrize("case", list(CASES))
def test_info_and_scan_refuse_the_same_header(case: str, good: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ckpt"
    shutil.copytree(good, ck)
    _write_case(ck, case)
    needle = CASES[case][2]
    for args in (("info", ck), ("info", ck / "model.safetensors"), ("scan", ck, *SCAN)):
        with deadline(30, case):
            result = invoke(*args)
        assert_input_error(result, str(ck / "model.safetensors"), needle)


def test_valid_header_variants_are_read(good: Path, tmp_path: Path) -> None:
    """What the format allows still reads: trailing-space padding, tensors in any key order, no ``__metadata__``
    or one with several string values."""
    header, data = split_file(good / "model.safetensors")
    h = json.loads(header)
    for metadata in (None, {"format": "pt", "note": "{[nested-looking]}"}):
        ck = tmp_path / f"ckpt-{metadata is None}"
        shutil.copytree(good, ck)
        entries = {k: v for k, v in reversed(h.items()) if k != "__metadata__"}
        doc = entries if metadata is None else {"__metadata__": metadata, **entries}
        join_file(ck / "model.safetensors", json.dumps(doc).encode() + b"    ", data)
        result = invoke("info", ck, "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["n_layers"] == 2


def _drop_tensor(h: dict, data: bytes, name: str) -> bytes:
    """Remove ``name`` from header ``h`` and its bytes from ``data``, shifting later offsets (still a valid file)."""
    begin, end = h.pop(name)["data_offsets"]
    for key, entry in h.items():
        if key != "__metadata__" and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [o - (end - begin) for o in entry["data_offsets"]]
    return data[:begin] + data[end:]


@pytest.mark.parametrize("case, needle", [("missing tensor", "transformer.wpe.weight"),
                                          ("transposed shape", "[192, 64]")])
def test_info_runs_the_open_time_checks_of_scan(case: str, needle: str, good: Path, tmp_path: Path) -> None:
    """A valid file that does not fit its family is refused by ``info`` exactly as by ``scan`` (both open the model
    the same way)."""
    ck = tmp_path / "ckpt"
    shutil.copytree(good, ck)
    header, data = split_file(ck / "model.safetensors")
    h = json.loads(header)
    if case == "missing tensor":
        data = _drop_tensor(h, data, "transformer.wpe.weight")
    else:
        h["transformer.h.0.attn.c_attn.weight"]["shape"] = [192, 64]
    join_file(ck / "model.safetensors", _as_text(h), data)
    errors = set()
    for args in (("info", ck), ("scan", ck, *SCAN)):
        result = invoke(*args)
        assert_input_error(result, needle)
        errors.add(result.stderr.splitlines()[0])
    assert len(errors) == 1, errors
