"""Scaling-law analysis: collect run folders into tables, fit laws with bootstrap CIs, compare families, plot, report.

```python
from analysis import collect_runs, fit_power_law_ci, fit_chinchilla, build_report
runs = collect_runs("runs/tiny-cpu").runs              # one row per finished run (pandas)
fit = fit_power_law_ci(runs.flops, runs.val_loss, n_boot=1000)
fit.law.formula("C"), fit.estimates["alpha"].fmt()     # 'L = E + A·C^−α' with numbers; 'α [lo, hi]'
build_report("runs/tiny-cpu")                          # what `ultramem plots` runs: figures, report.md/.html
```

Modules: checks (input errors), lse (the log-sum-exp law family, robust objectives, batched solver), fit
(single-variable laws), chinchilla (L(N, D) and its frontier), isoflop (Approach 2), bootstrap (CIs over runs),
collect (run folders -> tables), compare (families, compute multiplier, memory law, knowledge), holdout (L(N, D)
refitted without its largest budget or size, predicting those runs), refine (where an IsoFLOP study's next runs
go, `ultramem sweep refine`), hparams (LR scans: optima, lr*(N), variants, `ultramem hparams`), seeds (seed
distributions per configuration, `ultramem seeds`), schedules (WSD branches vs cosine at equal steps), synthetic
(run folders drawn from known laws, for checks), plots, report, wandb_report (the report logged to W&B, `ultramem
plots --wandb`). matplotlib loads only with plots/report
(build_report) and the seed figures.
"""

from analysis.bootstrap import Estimate, LawFit
from analysis.checks import FitError, NotEnoughPointsError
from analysis.chinchilla import (
    EPOCH_2024,
    HOFFMANN_2022,
    ChinchillaLaw,
    fit_chinchilla,
    fit_chinchilla_ci,
)
from analysis.collect import collect_runs, load_collected
from analysis.compare import compute_multiplier, fit_families, memory_laws
from analysis.fit import (
    LogLinear,
    PowerLaw,
    PurePowerLaw,
    fit_log_linear,
    fit_log_linear_ci,
    fit_power_law,
    fit_power_law_ci,
    fit_pure_power_law,
)
from analysis.isoflop import fit_frontier, isoflop_optima


def __getattr__(name: str):
    if name == "build_report":
        from analysis.report import build_report  # lazy: report loads plots and matplotlib (docstring above)

        return build_report
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


__all__ = [
    "EPOCH_2024",
    "HOFFMANN_2022",
    "ChinchillaLaw",
    "Estimate",
    "FitError",
    "LawFit",
    "LogLinear",
    "NotEnoughPointsError",
    "PowerLaw",
    "PurePowerLaw",
    "build_report",
    "collect_runs",
    "compute_multiplier",
    "fit_families",
    "fit_chinchilla",
    "fit_chinchilla_ci",
    "fit_frontier",
    "fit_log_linear",
    "fit_log_linear_ci",
    "fit_power_law",
    "fit_power_law_ci",
    "fit_pure_power_law",
    "isoflop_optima",
    "load_collected",
    "memory_laws",
]
