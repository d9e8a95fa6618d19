"""Name a weight file's format from its first bytes, and open torch files without running pickle code.

attnstab reads safetensors and ``torch.save`` files. Anything else that looks like weights (GGUF, a CTranslate2
``model.bin``, an empty or garbage file) is named by its magic bytes, so the user learns what the file is and that it
is not read, instead of a loader's internal message. torch files are opened only with ``weights_only=True``; a file
that needs more than tensors and plain containers is refused with our own words (torch's message suggests turning
the safety off, which attnstab never does).
"""
from __future__ import annotations

import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

from attnstab_cli.errors import InputError
from attnstab_cli.input_files import require_regular_file

GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"
NPY_MAGIC = b"\x93NUMPY"
_SNIFF_BYTES = 256


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(_SNIFF_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None


def _ctranslate2_spec(head: bytes) -> str | None:
    """The model spec name of a CTranslate2 ``model.bin`` (uint32 binary version, then a uint16-length,
    NUL-terminated spec name), or None when ``head`` does not start that way."""
    if len(head) < 7:
        return None
    version, length = struct.unpack_from("<IH", head)
    name = head[6:6 + length]
    if not (2 <= version <= 64 and 2 <= length <= len(head) - 6 and name.endswith(b"\0")):
        return None
    text = name[:-1]
    return text.decode("ascii") if text.isascii() and text.replace(b"_", b"").isalnum() else None


def _is_text(head: bytes) -> bool:
    """True when ``head`` decodes as UTF-8 without control characters other than whitespace (a cut multi-byte
    character at the end is allowed)."""
    cuts = range(4) if len(head) == _SNIFF_BYTES else range(1)
    for cut in cuts:
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return all(c.isprintable() or c in "\t\n\r" for c in text)
    return False


def sniff_format(path: Path) -> str:
    """``torch-zip``, ``torch-pickle``, ``gguf``, ``safetensors``, ``numpy`` or, for anything else, a phrase that
    says what the file is (empty, CTranslate2, unknown bytes)."""
    head = _head(path)
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if head.startswith(PICKLE_PROTO):
        return "torch-pickle"
    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if head.startswith(NPY_MAGIC):
        return "numpy"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    spec = _ctranslate2_spec(head)
    if spec is not None:
        return f"a CTranslate2 model ({spec})"
    if _is_text(head):
        return "a text file"
    return f"an unknown format (first bytes {head[:8].hex(' ')})"


def describe_format(fmt: str) -> str:
    """:func:`sniff_format`'s answer as words for a message."""
    return {"gguf": "a GGUF file", "torch-zip": "a zip archive (the torch.save format)",
            "torch-pickle": "a pickle stream (the legacy torch.save format)",
            "numpy": "a NumPy .npy array", "safetensors": "a safetensors file"}.get(fmt, fmt)


def load_torch_file(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` of a ``torch.save`` file (memory-mapped when it is the zip format); any
    other format, a refused pickle or a corrupt file is an :class:`InputError` naming ``path``. ``what`` names the
    expected content in messages (``torch checkpoint``, ``token file``)."""
    import torch

    fmt = sniff_format(require_regular_file(path))
    if fmt not in ("torch-zip", "torch-pickle"):
        raise InputError(f"is {describe_format(fmt)}, not a torch.save file; attnstab does not read it as a {what}",
                         path=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # torch warns about pickle protocols; the result decides
            return torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "torch-zip")
    except pickle.UnpicklingError:
        raise InputError(
            f"refused: this {what} holds Python objects beyond tensors and plain containers, which only arbitrary "
            "pickle code could load; attnstab never runs pickle code", path=path,
            hint="save plain tensors (or convert the file to safetensors) with a trusted tool",
        ) from None
    except Exception as exc:  # a corrupt archive or pickle stream surfaces as many exception types
        text = str(exc).strip()
        first = text.splitlines()[0] if text and "weights_only" not in text else type(exc).__name__
        raise InputError(f"corrupt torch.save file ({first})", path=path) from None


__all__ = ["describe_format", "load_torch_file", "sniff_format"]
