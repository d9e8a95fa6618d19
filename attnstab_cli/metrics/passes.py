"""The contract between a scan and its metric passes.

A pass declares its ``name`` and the passes it ``needs`` (whose columns, or whose per-trace publications on the
layer context, it reads). It sees every layer trace together with that layer's shared
:class:`~attnstab_cli.metrics.layer_context.LayerContext`; after the stream it merges what it accumulated with the
other ranks of the process group (``merge_ranks``: an identity in one process, THEORY §3.8's exact merges across
ranks, every rank ending with the whole run's state), and at the end returns its :class:`TableParts`, which
are joined by key into the report tables: per layer on ``layer``, per head on ``(layer, head)``. The scan runs the
passes in dependency order (:func:`order_passes`), so ``finish`` sees the tables of everything it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from attnstab_cli.distributed.group import Group
from attnstab_cli.model.traces import LayerTrace

if TYPE_CHECKING:
    from attnstab_cli.metrics.layer_context import LayerContext

Record = dict[str, Any]


@dataclass
class TableParts:
    """What one pass contributes: layer and head records, model-level columns, run facts for the manifest, and the
    reason for each column it leaves null for the whole model (the manifest's ``run.null_columns``)."""

    layers: list[Record] = field(default_factory=list)
    heads: list[Record] = field(default_factory=list)
    experts: list[Record] = field(default_factory=list)     # per (layer, expert) of mixture-of-experts layers
    model: Record = field(default_factory=dict)
    facts: Record = field(default_factory=dict)
    nulls: dict[str, str] = field(default_factory=dict)


@dataclass
class Tables(TableParts):
    """The report tables as the passes fill them: the union of every pass's parts, one keyed join per contribution."""

    def add(self, parts: TableParts) -> None:
        self.layers = join_records(self.layers, parts.layers, ("layer",))
        self.heads = join_records(self.heads, parts.heads, ("layer", "head"))
        self.experts = join_records(self.experts, parts.experts, ("layer", "expert"))
        self.model.update(parts.model)
        self.facts.update(parts.facts)
        self.nulls.update(parts.nulls)


class MetricPass(Protocol):
    """One family of report columns, measured on the streamed layer traces."""

    name: str
    needs: tuple[str, ...]

    def observe(self, trace: LayerTrace, ctx: LayerContext) -> None: ...

    def merge_ranks(self, group: Group) -> None: ...

    def finish(self, tables: Tables) -> TableParts: ...


def join_records(left: list[Record], right: list[Record], key: tuple[str, ...]) -> list[Record]:
    """Join two record lists on ``key``: both hold one record per key and the same keys (``left`` sets the order);
    an empty side contributes nothing."""
    if not right:
        return left
    if not left:
        return [dict(r) for r in right]
    by_key = {tuple(r[k] for k in key): r for r in right}
    if len(by_key) != len(right) or {tuple(r[k] for k in key) for r in left} != set(by_key):
        raise ValueError(f"records disagree on their {key} keys")
    return [{**r, **by_key[tuple(r[k] for k in key)]} for r in left]


def order_passes(passes: Sequence[MetricPass]) -> list[MetricPass]:
    """``passes`` in an order where every pass comes after those it needs (stable otherwise)."""
    by_name = {p.name: p for p in passes}
    if len(by_name) != len(passes):
        raise ValueError("two metric passes share a name")
    out: list[MetricPass] = []
    state: dict[str, str] = {}

    def visit(p: MetricPass) -> None:
        if state.get(p.name) == "done":
            return
        if state.get(p.name) == "open":
            raise ValueError(f"metric passes need each other in a cycle through {p.name!r}")
        state[p.name] = "open"
        for need in p.needs:
            if need not in by_name:
                raise ValueError(f"metric pass {p.name!r} needs {need!r}, which is not part of the scan")
            visit(by_name[need])
        state[p.name] = "done"
        out.append(p)

    for p in passes:
        visit(p)
    return out
