"""Everything a run's outputs are made of: its logged series (``series``), the figures and tables
(``figures``), the per-channel figures and histograms (``channel_figures``), the compact record of
a live run (``history``), the console texts (``summary``), the W&B extras (``wandb_extras``) and
the command line: ``python -m lightning_smd.report RUN``."""

from lightning_smd.report.figures import (
    FIGURE_FILES,
    REPORT_DIR,
    SUMMARY_FILE,
    draw_angular_update,
    lr_change_steps,
    lr_changes,
    main,
    markdown_summary,
    plot_angular_update,
    plot_ratio_heatmap,
    plot_unit_grad_sq,
    plot_weight_norm,
    save_figures,
    summary_rows,
)
from lightning_smd.report.series import RunSeries

__all__ = [
    "FIGURE_FILES",
    "REPORT_DIR",
    "SUMMARY_FILE",
    "RunSeries",
    "draw_angular_update",
    "lr_change_steps",
    "lr_changes",
    "main",
    "markdown_summary",
    "plot_angular_update",
    "plot_ratio_heatmap",
    "plot_unit_grad_sq",
    "plot_weight_norm",
    "save_figures",
    "summary_rows",
]
