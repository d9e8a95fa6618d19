"""Issue 2, item 6: peak resident weights do not grow with depth (one layer's weights at a time)."""
from __future__ import annotations

from pathlib import Path

import torch

from attnstab_cli.model.load import open_model
from attnstab_cli.model.stream import LayerStream
from tiny_models import save_tiny_model


def _peak_layer_bytes(path: Path) -> tuple[int, int]:
    """(largest resident bytes seen while a layer runs, reader's peak over the whole pass)."""
    model = open_model(path)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    stream = LayerStream(model, [ids])
    stream.embed()
    assert model.reader.live_bytes == 0            # embedding tables are dropped once batches are embedded
    peak = 0
    for trace in stream.layers():
        peak = max(peak, model.reader.live_bytes)
        del trace                                  # as run_scan does: hold nothing across layers
    stream.final_hidden()
    return peak, model.reader.peak_live_bytes


def test_peak_weight_memory_is_flat_in_depth(tmp_path: Path) -> None:
    save_tiny_model("gpt2", tmp_path / "shallow")
    import transformers

    config = transformers.GPT2Config(n_layer=24, n_embd=64, n_head=4, n_positions=64, vocab_size=97)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "deep")
    shallow_layer, shallow_peak = _peak_layer_bytes(tmp_path / "shallow")
    deep_layer, deep_peak = _peak_layer_bytes(tmp_path / "deep")
    one_layer = 4 * (64 * 4 + 64 * 192 + 192 + 64 * 64 + 64 + 64 * 256 + 256 + 256 * 64 + 64)
    assert shallow_layer == deep_layer == one_layer
    assert deep_peak == shallow_peak == one_layer
