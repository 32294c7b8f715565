"""List the model presets with their parameter counts and FLOPs (no torch import, instant).

  ultramem models                         every preset: family, params (total / active / non-embedding), FLOPs/token,
                                          and its source: "authors" (the authors' released configuration),
                                          "inferred (...)" (solved from published totals), "ours (tiny ladder)" or "ours (study ladder)"
  ultramem models --family ultramem       only one family
  ultramem models --format json           the same as a JSON list
  ultramem models --table1                the paper-size presets against the paper's Table 1 (3% tolerance)

flops_per_token is the forward pass per token at the preset's context length: 2 x activated non-embedding params
+ the output head + retrieval arithmetic + attention (ultramem.accounting). Training is 3x that. Table 1 counts
2 x activated non-embedding params only; --table1 uses that convention.
"""

from __future__ import annotations

import argparse
import json

from experiments.textfmt import format_table, human_fixed
from ultramem.accounting import count_params, flops_per_token
from ultramem.families import family_names
from ultramem.presets import PRESETS, preset_source, table1_comparison

HELP = "list model presets with parameter counts and FLOPs per token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--family", choices=family_names(), default=None,
                        help="only presets of this family")
    parser.add_argument("--table1", action="store_true",
                        help="compare the paper-size presets with Table 1 of the UltraMem paper instead")


def preset_rows(family: str | None = None) -> list[dict]:
    rows = []
    for name, cfg in PRESETS.items():
        if family and cfg.family != family:
            continue
        pc = count_params(cfg)
        rows.append({"name": name, "family": cfg.family, "total_params": pc.total, "active_params": pc.active,
                     "non_embedding_params": pc.non_embedding,
                     "active_non_embedding_params": pc.active_non_embedding,
                     "flops_per_token": flops_per_token(cfg, seq_len=cfg.seq_len),
                     "n_layers": cfg.n_layers, "d_model": cfg.d_model, "seq_len": cfg.seq_len,
                     "source": preset_source(name)})
    return rows


def _table(rows: list[dict], columns: list[tuple[str, str]], human: set[str], left: tuple[str, ...] = ()) -> str:
    """name and family (and the `left` columns) left-aligned, numbers right-aligned; the `human` columns as 1.234G."""
    cells = [[human_fixed(r[k]) if k in human else str(r[k]) for k, _ in columns] for r in rows]
    right = [i for i, (k, _) in enumerate(columns) if i >= 2 and k not in left]
    return format_table([h for _, h in columns], cells, right=right, rule=False, strip=False)


def run(args: argparse.Namespace) -> int:
    if args.table1:
        rows = table1_comparison()
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        else:
            cols = [("preset", "preset"), ("within_tolerance", "ok"), ("params_b", "params (B)"),
                    ("paper_params_b", "paper"), ("params_rel_err", "rel err"), ("gflops", "GFLOPs/token"),
                    ("paper_gflops", "paper"), ("gflops_rel_err", "rel err")]
            print(_table(rows, cols, set()))
        return 0 if all(r["within_tolerance"] for r in rows) else 1
    rows = preset_rows(args.family)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    cols = [("name", "name"), ("family", "family"), ("total_params", "total"), ("active_params", "active"),
            ("non_embedding_params", "non-emb"), ("active_non_embedding_params", "active non-emb"),
            ("flops_per_token", "fwd FLOPs/token"), ("n_layers", "layers"), ("d_model", "d_model"),
            ("seq_len", "seq_len"), ("source", "source")]
    print(_table(rows, cols, {"total_params", "active_params", "non_embedding_params",
                              "active_non_embedding_params", "flops_per_token"}, left=("source",)))
    return 0
