"""Weight fingerprint (issue 5, item 1): ``full`` sees every byte; ``sampled`` reads a bounded amount and still sees
the header, the sampled blocks and the file size."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from attnstab_cli.checkpoints import fingerprint as fp
from attnstab_cli.checkpoints.fingerprint import compute_fingerprint

SIZE = 24 << 20


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp") / "model.safetensors"
    path.write_bytes(hashlib.sha256(b"seed").digest() * (SIZE // 32))
    return path


def _flip(src: Path, dst: Path, offset: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def test_full_hash_is_the_sha256_of_name_size_and_bytes(big: Path) -> None:
    expected = hashlib.sha256(f"{big.name}\0{SIZE}\0".encode() + big.read_bytes()).hexdigest()
    assert compute_fingerprint([big], "full") == f"sha256:{expected}"


SPAN = SIZE - 2 * fp.HEAD_BYTES - fp.BLOCK_BYTES
BLOCK_10 = fp.HEAD_BYTES + SPAN * 10 // (fp.N_BLOCKS - 1)      # where sampled block 10 starts


@pytest.mark.parametrize("offset", [0, BLOCK_10 + 7, SIZE - 1], ids=["header", "sampled-block", "tail"])
def test_both_modes_see_header_sampled_blocks_and_tail(big: Path, tmp_path: Path, offset: int) -> None:
    other = _flip(big, tmp_path / big.name, offset)
    for mode in ("sampled", "full"):
        assert compute_fingerprint([big], mode) != compute_fingerprint([other], mode)


def test_sampled_misses_an_unsampled_byte_and_full_does_not(big: Path, tmp_path: Path) -> None:
    gap = fp.HEAD_BYTES + SPAN // (fp.N_BLOCKS - 1) - 100        # just before block 1: never read when sampled
    other = _flip(big, tmp_path / big.name, gap)
    assert compute_fingerprint([big], "sampled") == compute_fingerprint([other], "sampled")
    assert compute_fingerprint([big], "full") != compute_fingerprint([other], "full")


def test_sampled_reads_a_bounded_amount(big: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read = 0
    real_open = Path.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            nonlocal read
            data = self.f.read(n)
            read += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Counting(real_open(self, *a, **k)))
    compute_fingerprint([big], "sampled")
    assert read == 2 * fp.HEAD_BYTES + fp.N_BLOCKS * fp.BLOCK_BYTES < SIZE // 3


def test_size_and_name_enter_the_fingerprint(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"x" * 100)
    assert compute_fingerprint([a]) != compute_fingerprint([b])
    assert compute_fingerprint([a]).startswith("sampled-sha256:") and compute_fingerprint([a], "full") != \
        compute_fingerprint([a])
    with pytest.raises(ValueError):
        compute_fingerprint([a], "partial")
