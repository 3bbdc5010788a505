"""The benchmark's report: the table printed at the end and the optional PNG."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Label = Callable[[str], str]
"""Turns a mode name into its column label (``"rate"`` -> ``"100/s"``)."""


def fmt(value: Any, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>{width}{spec}}"


COLUMNS = [
    # title, key, format spec, width
    ("server", "server", "", 26),
    ("C", "C", ",", 6),
    ("mode", "mode_label", "", 6),
    ("pub/s", "published_per_s", ",.0f", 7),
    ("delivered/s", "delivered_per_s", ",.0f", 11),
    ("%floor", "pct_of_floor", ".0f", 6),
    ("p50 ms", "p50_ms", ".1f", 7),
    ("p99 ms", "p99_ms", ".1f", 7),
    ("p99/floor", "p99_vs_floor", ".2f", 9),
    ("missed", "missed", ",", 9),
    ("disc", "disconnects", ",", 5),
    ("KiB/conn", "kib_per_idle_connection", ".1f", 8),
    ("cli CPU", "client_cpu_pct", ".0f", 7),
    ("cli us/ev", "client_cpu_us_per_event", ".1f", 9),
    ("srv CPU", "server_cpu_pct", ".0f", 7),
    ("srv us/ev", "server_cpu_us_per_event", ".1f", 9),
    ("cpu/asgi", "cpu_vs_asgi_floor", ".2f", 8),
    ("srv wait", "server_wait_pct", ".0f", 8),
    ("redis conn", "redis_connections", ",", 10),
]


MODE_ORDER = {"rate": 0, "thread": 1, "max": 2, "burst": 3}


ASGI_COLUMNS = [
    ("server", "deployment", "", 17),
    ("asgi server", "asgi_server", "", 17),
    ("C", "C", ",", 6),
    ("KiB/conn", "kib_per_idle_connection", ".1f", 8),
    ("streams/GiB", "streams_per_gib", ",.0f", 11),
    ("srv us/ev", "server_cpu_us_per_event", ".1f", 9),
    ("deliveries/core-s", "deliveries_per_core_s", ",.0f", 17),
    ("cpu/asgi", "cpu_vs_asgi_floor", ".2f", 8),
    ("missed", "missed", ",", 9),
]


def case_key(row: dict[str, Any]) -> tuple[int, int]:
    return row["C"], MODE_ORDER.get(row["mode"], 9)


def table(rows: list[dict[str, Any]], label: Label) -> str:
    """Return the main table: a row per server (and ASGI server), C and mode."""
    server_width = max([26, *(len(row["server"]) for row in rows)])
    columns = [("server", "server", "", server_width), *COLUMNS[1:]]
    lines = [" | ".join(f"{title:>{width}}" for title, _, _, width in columns)]
    lines.append("-" * len(lines[0]))
    for row in sorted(rows, key=case_key):
        if "error" in row:
            lines.append(f"{row['server']:>{server_width}} | {row['C']:>6,} | {row['error']}")
            continue
        row = {**row, "mode_label": label(row["mode"])}
        lines.append(" | ".join(fmt(row.get(key), spec, width) for _, key, spec, width in columns))
    return "\n".join(lines)


def asgi_table(rows: list[dict[str, Any]]) -> str:
    """Return the per-ASGI-server table of the ``rate`` rows: memory and CPU per stream."""
    rate = [row for row in rows if row.get("mode") == "rate"]
    # By C, then the ASGI servers in the order they were measured (floor's None first).
    order = {
        asgi: index for index, asgi in enumerate(dict.fromkeys(r["asgi_server"] for r in rate))
    }
    rate.sort(key=lambda row: (row["C"], order[row["asgi_server"]]))
    lines = [" | ".join(f"{title:>{width}}" for title, _, _, width in ASGI_COLUMNS)]
    lines.append("-" * len(lines[0]))
    for row in rate:
        lines.append(
            " | ".join(fmt(row.get(key), spec, width) for _, key, spec, width in ASGI_COLUMNS)
        )
    return "\n".join(lines)


def redis_hop(rows: list[dict[str, Any]], label: Label) -> list[str]:
    """Return a line per saturated case: ssecast with ``RedisBackend`` over the memory backend."""
    delivered = {
        (row["server"], row["C"], row["mode"]): row["delivered_per_s"]
        for row in rows
        if "delivered_per_s" in row
    }
    lines = []
    for (server, count, mode), value in sorted(delivered.items(), key=lambda item: item[0][1:]):
        memory = delivered.get(("ssecast", count, mode))
        if server != "ssecast-redis" or mode not in ("max", "burst") or not memory:
            continue
        lines.append(
            f"Redis hop, C={count:,} {label(mode)}: ssecast-redis delivers {value:,.0f}/s, "
            f"{100 * value / memory:.0f}% of ssecast's {memory:,.0f}/s "
            f"(the hop costs {100 * (1 - value / memory):.0f}%)"
        )
    return lines


def plot(rows: list[dict[str, Any]], path: str, label: Label, duration: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [row for row in rows if "error" not in row]
    servers = list(dict.fromkeys(row["server"] for row in good))
    by_key = {(row["server"], row["C"], row["mode"]): row for row in good}
    cases = sorted({(*case_key(row), row["mode"]) for row in good})
    labels = [f"C={count:,}\n{label(mode)}" for count, _, mode in cases]
    counts = sorted({row["C"] for row in good})
    figure, axes = plt.subplots(2, 2, figsize=(16, 10))
    width = 0.8 / max(1, len(servers))

    def bars(axis: Any, title: str, keys: list[tuple[int, str]], names: list[str], field: str):
        for index, server in enumerate(servers):
            values = [(by_key.get((server, *key)) or {}).get(field) or 0 for key in keys]
            offsets = [i + index * width for i in range(len(keys))]
            axis.bar(offsets, values, width, label=server)
        axis.set_xticks([i + width * (len(servers) - 1) / 2 for i in range(len(keys))])
        axis.set_xticklabels(names)
        axis.set_title(title)

    keys = [(count, mode) for count, _, mode in cases]
    bars(axes[0][0], "delivered events/s (higher is better)", keys, labels, "delivered_per_s")
    bars(axes[0][1], "p99 latency, ms, log scale (lower is better)", keys, labels, "p99_ms")
    axes[0][1].set_yscale("log")
    bars(
        axes[1][0],
        "server CPU µs per delivered event (lower is better)",
        keys,
        labels,
        "server_cpu_us_per_event",
    )
    first_mode = {count: mode for count, _, mode in reversed(cases)}
    memory_keys = [(count, first_mode[count]) for count in counts]
    bars(
        axes[1][1],
        "server memory per idle connection, KiB (lower is better)",
        memory_keys,
        [f"C={count:,}" for count in counts],
        "kib_per_idle_connection",
    )
    axes[0][0].legend(fontsize=9)
    figure.suptitle(
        f"SSE fan-out over loopback, {duration:g} s runs (server pinned to CPU 0, client to CPU 1)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
