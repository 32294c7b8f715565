"""Scaling-law analysis: collect run folders into tables, fit laws with bootstrap CIs, compare families, plot, report.

```python
from analysis import collect_runs, fit_power_law_ci, fit_chinchilla, compare_families, build_report
runs = collect_runs("runs/tiny_cpu").runs            # one row per run (pandas)
fit = fit_power_law_ci(runs.flops, runs.val_loss, n_boot=1000)
fit.law.formula("C"), fit.estimates["alpha"].fmt()   # 'L = 1.82 + 482·C^−0.348', '0.348 [0.317, 0.373]'
```

Modules: checks (input errors), lse (the log-sum-exp law family, robust objectives, batched solver), fit
(single-variable laws), chinchilla (L(N, D) and its frontier), isoflop (Approach 2), bootstrap (CIs over runs),
collect (run folders -> tables), compare (families, compute multiplier, memory law, knowledge), plots, report.
Heavy modules (plots, report) are imported on first use.
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
    "fit_chinchilla",
    "fit_chinchilla_ci",
    "fit_frontier",
    "fit_log_linear",
    "fit_log_linear_ci",
    "fit_power_law",
    "fit_power_law_ci",
    "fit_pure_power_law",
    "isoflop_optima",
]
