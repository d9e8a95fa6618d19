"""Explicit Parquet schemas of the report tables (STYLE.md, "Reports"): key columns first, units and descriptions
in each field's metadata, null for "not applicable". A schema change bumps ``SCHEMA_VERSION``.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    unit: str
    description: str


I64, F64 = pa.int64(), pa.float64()

LAYER_COLUMNS: tuple[Column, ...] = (
    Column("layer", I64, "index", "0-based layer index"),
    Column("r_resid_max", F64, "l2", "max token l2 norm of the residual stream h_l entering the layer"),
    Column("r_resid_mean", F64, "l2", "mean token l2 norm of h_l"),
    Column("r_ln_mean", F64, "l2", "mean token l2 norm at the attention input (N1(h_l) in pre-norm layers)"),
    Column("r2_in", F64, "l2", "max token l2 norm at the attention input (R_2 of THEORY §5.2)"),
    Column("r2_ffn_in", F64, "l2", "max token l2 norm at the FFN input"),
    Column("norm1_min_var", F64, "variance",
           "smallest per-token variance (LayerNorm) or mean square (RMSNorm) at the first norm's input"),
    Column("norm2_min_var", F64, "variance", "the same at the second norm's input"),
)

HEAD_COLUMNS: tuple[Column, ...] = (
    Column("layer", I64, "index", "0-based layer index"),
    Column("head", I64, "index", "query head h"),
    Column("kv_head", I64, "index", "key/value head g(h) = h // (H / H_kv)"),
    Column("n_rows", I64, "rows", "attention rows aggregated (n_keys >= min_keys)"),
    Column("n_rows_short", I64, "rows", "rows excluded from the descriptive aggregates (n_keys < min_keys)"),
    Column("theta_mean", F64, "1", "mean certified lower value theta_lo over aggregated rows"),
    Column("theta_hi_mean", F64, "1", "mean certified upper value theta_hi over aggregated rows"),
    Column("theta_lo_min", F64, "1", "smallest certified lower value"),
    Column("theta_p05", F64, "1", "5th percentile of theta_lo (histogram midpoint, error <= 0.001)"),
    Column("theta_p05_lo", F64, "1", "lower end of the bracket containing the 5th percentile"),
    Column("theta_p05_hi", F64, "1", "upper end of the bracket containing the 5th percentile"),
    Column("theta_p50", F64, "1", "median of theta_lo (histogram midpoint)"),
    Column("theta_p50_lo", F64, "1", "lower end of the bracket containing the median"),
    Column("theta_p50_hi", F64, "1", "upper end of the bracket containing the median"),
    Column("theta_width_max", F64, "1", "largest interval width theta_hi - theta_lo"),
    Column("theta_exact_frac", F64, "fraction", "fraction of rows with width <= 1e-12"),
    Column("theta_tilde_lo", F64, "1", "max over ALL rows of theta_lo (lower end of the bracket of max theta)"),
    Column("theta_tilde_hi", F64, "1", "max over ALL rows of theta_hi (used by the Lipschitz bounds)"),
    Column("theta_paper_mean", F64, "1", "mean of the paper's sorted-prefix estimate (not a bound; comparability)"),
    Column("pmax_mean", F64, "probability", "mean largest attention probability"),
    Column("pmax_max", F64, "probability", "largest attention probability of any aggregated row"),
    Column("peaked_frac", F64, "fraction", "fraction of rows with p_max >= 1/2 (theta exact there)"),
    Column("entropy_mean", F64, "nats", "mean row entropy"),
    Column("theta_wide_rows", I64, "rows",
           "rows (of all) whose interval stayed wider than theta_tol: not refined within --theta-rows"),
)

TABLES: dict[str, tuple[Column, ...]] = {"layers": LAYER_COLUMNS, "heads": HEAD_COLUMNS}


def arrow_schema(table: str) -> pa.Schema:
    """The pyarrow schema of ``table`` with per-field unit/description metadata."""
    return pa.schema(
        [pa.field(c.name, c.type, nullable=True, metadata={"unit": c.unit, "description": c.description})
         for c in TABLES[table]],
        metadata={"schema_version": SCHEMA_VERSION, "table": table},
    )
