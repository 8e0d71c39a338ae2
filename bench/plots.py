"""PNG plots of a run (matplotlib, from ``requirements-bench.txt``; the harness test skips them).

``make_plots(document, out_dir)`` draws what the results hold and returns the files written:
latency distributions (scenarios 1 and 3), memory per agent against agent count (5), the
reconnect storm (6) and the RSS of a stalled technician's API and gateway (7).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ecdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    ordered = sorted(values)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})")


def make_plots(document: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    scenarios = document["scenarios"]
    written: list[Path] = []
    title = f"{document['profile']} profile, {document['started_at'][:10]}"

    latency = [key for key in ("roundtrip", "open") if scenarios.get(key, {}).get("samples")]
    if latency:
        fig, axes = plt.subplots(1, len(latency), figsize=(6 * len(latency), 4), squeeze=False)
        for ax, key in zip(axes[0], latency, strict=True):
            for label, values in scenarios[key]["samples"].items():
                _ecdf(ax, values, label)
            ax.set_xscale("log")
            ax.set_xlabel("latency (ms, log scale)")
            ax.set_ylabel("fraction of calls")
            ax.set_title(f"{scenarios[key]['number']}. {scenarios[key]['title']}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Latency distributions ({title})")
        fig.tight_layout()
        written.append(out_dir / "latency.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    idle = scenarios.get("idle", {}).get("samples")
    if idle and idle.get("agents"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
        agents = idle["agents"]
        left.plot(agents, idle["gurutunnel KiB per agent"], "o-", label="gurutunnel gateway")
        left.plot(agents, idle["bare KiB per agent"], "s-", label="bare websockets server")
        left.set_xlabel("connected agents")
        left.set_ylabel("KiB per agent ((RSS at N - RSS at 0) / N)")
        left.set_ylim(bottom=0)
        left.grid(True, alpha=0.3)
        left.legend()
        right.plot(agents, idle["gurutunnel RSS MiB"], "o-", label="gurutunnel gateway")
        right.plot(agents, idle["bare RSS MiB"], "s-", label="bare websockets server")
        right.set_xlabel("connected agents")
        right.set_ylabel("process RSS (MiB)")
        right.grid(True, alpha=0.3)
        right.legend()
        fig.suptitle(f"5. Memory per idle agent ({title})")
        fig.tight_layout()
        written.append(out_dir / "memory.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    storm = scenarios.get("storm", {}).get("samples")
    if storm and storm.get("gurutunnel t"):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(storm["gurutunnel t"], storm["gurutunnel back"], label="gurutunnel gateway")
        ax.plot(storm["bare t"], storm["bare back"], label="bare websockets server")
        ax.set_xlabel("seconds after SIGKILL")
        ax.set_ylabel("agents connected again")
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"6. Reconnect storm ({title})")
        fig.tight_layout()
        written.append(out_dir / "storm.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    stalled = scenarios.get("stalled", {}).get("samples")
    if stalled:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, values in stalled.items():
            if not label.endswith(" RSS MiB"):
                continue
            times = stalled.get(label.replace(" RSS MiB", " t"))
            ax.plot(times or [i * 0.1 for i in range(len(values))], values, label=label)
        ax.set_xlabel("seconds after the technicians stopped reading")
        ax.set_ylabel("RSS (MiB)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"7. Stalled technicians ({title})")
        fig.tight_layout()
        written.append(out_dir / "stalled.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
