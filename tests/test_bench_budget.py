"""bench.run_flexrun reports the run's peaks as the budget check counts them, against the
budgets: over when the peak exceeds one, within otherwise, nothing without budgets."""
from types import SimpleNamespace

import torch

from bench.run_flexrun import peaks_vs_budgets
from flexrun.engine.budget import BudgetCheck


def _llm(cpu_mem):
    return SimpleNamespace(budget=BudgetCheck(torch.device("cpu"), None, cpu_mem))


def test_peaks_against_the_cpu_budget():
    tight, roomy = _llm(1 << 20), _llm(1 << 50)     # 1 MiB: below any process's RSS
    try:
        over, within = peaks_vs_budgets(tight), peaks_vs_budgets(roomy)
    finally:
        tight.budget.close()
        roomy.budget.close()
    assert over["cpu_within"] is False and over["cpu_peak_GB"] > over["cpu_budget_GB"]
    assert within["cpu_within"] is True and "gpu_peak_GB" not in within
    assert peaks_vs_budgets(SimpleNamespace(budget=None)) is None
