"""Rebuild ``docs/homogeneous_margin.png`` and ``docs/homogeneous_sparsity.png`` (the README's
"Homogeneous networks" figures) from the two example presets, run in-process through
``examples/train.py``'s :func:`train` exactly as ``python examples/train.py experiment=...`` does:

* ``experiment=margin_digits``: normalized margin γ̄ and smoothed margin γ̃ against step;
* ``experiment=ewn_vs_swn``: relative sparsity per layer against step, EWN against SWN, and the
  pruning curves (``docs/homogeneous_pruning.png``).

    python docs/make_homogeneous_figures.py [--out docs] [--only margin_digits|ewn_vs_swn]

Prints every number the figures show (read back from the runs' metrics.csv). Needs the
``examples`` extra (matplotlib, scikit-learn, scikit-image, hydra-core).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_smd.homogeneous import figures  # noqa: E402


def run_preset(name: str, run_dir: Path, overrides: list[str] = ()) -> tuple[dict, list]:
    """``train()`` of ``experiment=name``; returns its result and the HomogeneousCallback(s)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import examples.resolvers  # noqa: F401
    from examples import train as train_module

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=[f"experiment={name}", "print_config=false", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
        cfg.hydra.job.id = "docs"
    HydraConfig.instance().set_config(cfg)
    built = []
    original = train_module.build_callbacks

    def keep(cfg_):
        callbacks = original(cfg_)
        built.extend(callbacks)
        return callbacks

    train_module.build_callbacks = keep
    try:
        result = train_module.train(cfg)
    finally:
        train_module.build_callbacks = original
    from lightning_smd.homogeneous.callback import HomogeneousCallback

    return result, [cb for cb in built if isinstance(cb, HomogeneousCallback)]


def read_history(metrics_csv: str, prefix: str) -> list[tuple[int, dict[str, float]]]:
    """``[(step, {key: value})]`` of the ``prefix/*`` keys of a metrics.csv."""
    out: dict[int, dict[str, float]] = {}
    with open(metrics_csv) as fh:
        for row in csv.DictReader(fh):
            values = {k: float(v) for k, v in row.items() if k.startswith(f"{prefix}/") and v not in ("", None)}
            if values:
                out.setdefault(int(row["step"]), {}).update(values)
    return sorted(out.items())


def margin_figure(out: Path, run_root: Path) -> None:
    result, _ = run_preset("margin_digits", run_root / "margin_digits")
    history = read_history(result["metrics_csv"], "homogeneous")
    print("\nmargin_digits (read back from metrics.csv):")
    print(f"{'step':>6} {'ρ':>8} {'γ̄':>11} {'γ̃':>11} {'p05':>11} {'p50':>11}")
    for step, m in history:
        g = lambda k: f"{m[k]:.4e}" if k in m else "—"  # noqa: E731
        print(f"{step:>6} {m['homogeneous/param_norm']:>8.4f} {g('homogeneous/normalized_margin'):>11} "
              f"{g('homogeneous/smoothed_margin'):>11} {g('homogeneous/margin/p05'):>11} {g('homogeneous/margin/p50'):>11}")
    path = figures.plot_margin({"digits MLP (L=3)": history}, out / "homogeneous_margin.png")
    print(f"wrote {path}")


def sparsity_figures(out: Path, run_root: Path) -> None:
    result, callbacks = run_preset("ewn_vs_swn", run_root / "ewn_vs_swn")
    histories = {name: read_history(result["metrics_csv"], f"homogeneous/{name}") for name in ("ewn", "swn")}
    train = read_history(result["metrics_csv"], "train")
    last = [m for _, m in train if "train/log_loss_ewn" in m][-1]
    print("final training loss (mean exponential loss of the last logged step, as its natural log): "
          + ", ".join(f"{n.upper()} log 𝓛 = {last[f'train/log_loss_{n}']:.4g}" for n in ("ewn", "swn")))
    for name, history in histories.items():
        norms = {k.rsplit("/", 1)[1]: v for k, v in history[-1][1].items() if "/layer_norm/" in k}
        print(f"  {name.upper()} at step {history[-1][0]}: layer norms ‖W‖ " + ", ".join(f"layer {k}: {v:.4g}" for k, v in norms.items())
              + f"; γ̄ = {history[-1][1].get(f'homogeneous/{name}/normalized_margin', float('nan')):.4g}")
    print("\newn_vs_swn relative sparsity (fraction of units with r_u < t), read back from metrics.csv:")
    for name, history in histories.items():
        for step, m in history[:: max(1, len(history) // 5)] + history[-1:]:
            cols = {k.split("/", 3)[3]: v for k, v in m.items() if "/relative_sparsity/" in k}
            cols.update({f"min_r/{k.rsplit('/', 1)[1]}": v for k, v in m.items() if "/min_relative_norm/" in k})
            print(f"  {name} step {step:>5}: " + "  ".join(f"{k}={v:.3f}" for k, v in sorted(cols.items())))
    relabeled = {name: [(s, {k.replace(f"homogeneous/{name}/", "homogeneous/"): v for k, v in m.items()})
                        for s, m in history] for name, history in histories.items()}
    print(f"wrote {figures.plot_sparsity({n.upper(): h for n, h in relabeled.items()}, out / 'homogeneous_sparsity.png')}")
    for cb in callbacks:
        print(f"  {cb.prefix.split('/')[-1].upper()} smallest relative unit norm min_u r_u at the end: "
              + ", ".join(f"layer {k}: {v:.3f}" for k, v in cb.min_relative_norm.items()))
    curves = {cb.prefix.split('/')[-1].upper(): cb.pruning for cb in callbacks if cb.pruning}
    print("pruning curves (fraction of the hidden layer's smallest units zeroed → training accuracy):")
    for name, curve in curves.items():
        print(f"  {name}: " + "  ".join(f"{p:.0%}→{a:.3f}" for p, a in curve.items()))
    print(f"wrote {figures.plot_pruning(curves, out / 'homogeneous_pruning.png')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--only", choices=("margin_digits", "ewn_vs_swn"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "margin_digits"):
            margin_figure(args.out, Path(tmp))
        if args.only in (None, "ewn_vs_swn"):
            sparsity_figures(args.out, Path(tmp))


if __name__ == "__main__":
    main()
