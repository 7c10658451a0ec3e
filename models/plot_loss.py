"""Draw the training curves in models/logs/*_log.json to models/<model>_loss.png (matplotlib, Agg).

Leaves out anything not in the logs (they hold one record per evaluation, every 200 steps).

    python3 models/plot_loss.py
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def plot(model: str):
    log = json.loads((HERE / "logs" / f"{model}_log.json").read_text())
    steps = log["steps"]
    tok = [r["tokens"] / 1e6 for r in steps]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(tok, [r["train_loss"] for r in steps], "o-", label="train loss (last batch)")
    if model == "pydoc":
        ax.plot(tok, [r["val_loss"] for r in steps], "s-", label="held-out loss (64 x 2048 tokens)")
        best = next(r for r in steps if r["step"] == log["saved_step"])
        ax.axvline(best["tokens"] / 1e6, color="grey", ls=":", label=f"shipped: step {best['step']}")
        ax.set_title(f"minisparse-pydoc: {log['params'] / 1e6:.1f}M params, ctx {log['config']['ctx']}")
    else:
        ax.plot(tok, [r["key_loss"] for r in steps], "s-", label="loss on the key tokens")
        ax2 = ax.twinx()
        ax2.plot(tok, [r["acc_2048"] for r in steps], "g^--", label="key accuracy, 2048 tokens")
        ax2.set_ylabel("accuracy (16 held-out examples)")
        ax2.set_ylim(-0.05, 1.05)
        ax2.legend(loc="center right", fontsize=8)
        ax.set_title(f"minisparse-passkey: {log['params'] / 1e6:.1f}M params, 512-8192 tokens")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(loc="upper right" if model == "pydoc" else "center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / f"{model}_loss.png", dpi=100)


if __name__ == "__main__":
    for m in ("pydoc", "passkey"):
        plot(m)
