"""PNG plots of a study under ``<tune dir>/plots``: optimisation history and parameter importance
per objective (optuna.visualization.matplotlib), and the Pareto front for two objectives.

Importance is computed for each objective in its own direction: Optuna's default evaluator
(PED-ANOVA) scores what drives the target *low*, so an objective to maximise is negated first.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from grid.tune.space import DIRECTIONS, TuneBlock

log = logging.getLogger("bdgrid.tune")


def write_plots(t: TuneBlock, study, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    complete = [x for x in study.trials if x.values is not None]
    with warnings.catch_warnings():  # optuna.visualization.matplotlib is marked experimental
        warnings.simplefilter("ignore")
        for i, o in enumerate(t.objectives):
            multi = len(t.objectives) > 1
            target = (lambda x, i=i: x.values[i]) if multi else None
            ax = ovm.plot_optimization_history(study, target=target, target_name=o)
            paths.append(folder / f"history-{o}.png")
            ax.figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
            if len(complete) >= 2 and t.space:
                sign = -1.0 if DIRECTIONS[o] == "maximize" else 1.0
                try:
                    ax = ovm.plot_param_importances(study, target=lambda x, i=i, s=sign: s * x.values[i],
                                                    target_name=o)
                except (RuntimeError, ValueError) as e:  # e.g. every trial with the same value
                    log.warning("no parameter importance for %s: %s", o, e)
                    continue
                paths.append(folder / f"importance-{o}.png")
                ax.figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
                plt.close(ax.figure)
        if len(t.objectives) == 2 and complete:
            ax = ovm.plot_pareto_front(study, target_names=list(t.objectives))
            paths.append(folder / "pareto.png")
            ax.figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
    return paths
