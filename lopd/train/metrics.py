"""Per-step training metrics: JSONL, TensorBoard events, progress (:mod:`lopd.progress`), PNG curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lopd.progress import Progress


class MetricsLog:
    """Rank-0 metrics sink. ``history`` (list of dicts) is JSON, kept in checkpoints for resume."""

    def __init__(self, out_dir: Path, total_steps: int, history: list[dict[str, Any]] | None = None,
                 enabled: bool = True, desc: str = "train"):
        self.out_dir, self.enabled, self.history = out_dir, enabled, list(history or [])
        self.tb = self.bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        for rec in self.history:  # a resumed run rewrites the earlier steps' events
            self._tb(rec)
        self.bar = Progress(total_steps, desc, "step", initial=len(self.history))

    def _tb(self, rec: dict[str, Any]) -> None:
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, rec["step"])

    def log(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if not self.enabled:
            return
        self._tb(rec)
        self.bar.update(1, {k: f"{v:.4g}" for k, v in rec.items() if k in ("loss", "lr", "grad_norm")}, **rec)

    def close(self, plot_keys: list[str]) -> None:
        """Write ``metrics.jsonl`` and ``curves.png`` into ``out_dir``."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        with open(self.out_dir / "metrics.jsonl", "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")
        plot_curves(self.history, plot_keys, self.out_dir / "curves.png")


def plot_curves(history: list[dict[str, Any]], keys: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in history)]
    cols = 3
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        pts = [(r["step"], r[k]) for r in history if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
