"""The benchmark's outputs: results JSON, the printed table, the PNG chart.

Every figure carries the server's numbers and the raw baseline's (median, min, max, n,
samples) and `ratio` = server median / raw median. For tok/s a ratio below 1 means
slower than raw; for ms and s a ratio above 1 means slower than raw. The latency figures
also carry the SDK floor's numbers (`floor`: the same calls against tests/bench/floor.py's
stub) and `overhead_ms` = server median - raw median - floor median: what the server adds
above the best a client can see. Each tenants figure carries `scaling` = its median / the
1-tenant median. `targets` checks the issue's goals against those.

    python -m tests.bench.report OUT/bench.json     # print the table (and redraw the PNG) again
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tests.bench import spec

SCHEMA = "tinkerd-bench/2"  # 2: the SDK floor, overhead_ms, tenants, targets
JSON_NAME = "bench.json"
PNG_NAME = "bench.png"
BUSY_WARNING = 0.15  # idle machines show a few percent


def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    info = {"hostname": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        import tinker

        info["tinker_sdk"] = tinker.__version__
    except Exception:
        pass
    return info


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of the machine's CPU time that was not idle over the next `seconds` (Linux)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


def git_commit(repo: Path) -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _median(stats: dict | None) -> float | None:
    return stats.get("median") if stats else None


def overhead_ms(key: str, unit: str, server: dict, raw: dict | None, floor: dict | None) -> float | None:
    """Server median - raw median - SDK floor median, in ms: latency figures only."""
    medians = [_median(server), _median(raw), _median(floor)]
    if key not in spec.LATENCY_KEYS or None in medians:
        return None
    return (medians[0] - medians[1] - medians[2]) * (1e3 if unit == "s" else 1.0)


def figure_entries(sizes: spec.Sizes, server: dict[str, list[float]], raw: dict[str, dict] | None,
                   floor: dict[str, list[float]], notes: dict[str, str]) -> list[dict]:
    entries = []
    for fig in spec.figures(sizes):
        ours = spec.summarize(server.get(fig.key, []))
        theirs = (raw or {}).get(fig.key)
        base = spec.summarize(floor[fig.key]) if fig.key in floor else None
        ratio = None
        if ours["median"] is not None and _median(theirs):
            ratio = ours["median"] / theirs["median"]
        entries.append({"key": fig.key, "workload": fig.workload, "unit": fig.unit, "better": fig.better,
                        "what": fig.what, "raw_what": fig.raw_what, "server": ours, "raw": theirs,
                        "ratio": ratio, "floor": base,
                        "overhead_ms": overhead_ms(fig.key, fig.unit, ours, theirs, base), "note": notes.get(fig.key)})
    one = next((_median(e["server"]) for e in entries if e["key"] == spec.tenants_key(1)), None)
    for e in entries:
        if e["key"].startswith("tenants_"):
            e["scaling"] = e["server"]["median"] / one if one and e["server"]["median"] is not None else None
    return entries


def target_results(figures: list[dict]) -> list[dict]:
    """Each of spec.TARGETS with its measured value and pass (True / False / None: not measured)."""
    by_key = {f["key"]: f for f in figures}
    out = []
    for t in spec.TARGETS:
        value = by_key.get(t.key, {}).get(t.measure)
        out.append({"target": t.text, "figure": t.key, "measure": t.measure, "op": t.op, "threshold": t.threshold,
                    "value": value, "pass": t.passes(value)})
    return out


def build(*, target: dict, sizes: spec.Sizes, server: dict[str, list[float]], raw_result: dict | None,
          raw_skipped: str | None, floor: dict[str, list[float]], floor_skipped: str | None, floor_runs: int,
          notes: dict[str, str], started: datetime, loadavg: dict) -> dict:
    figures = figure_entries(sizes, server, raw_result["figures"] if raw_result else None, floor, notes)
    return {
        "schema": SCHEMA,
        "date": started.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "loadavg": loadavg,
                    **({k: raw_result[k] for k in ("torch", "torch_threads", "accelerator") if k in raw_result}
                       if raw_result else {})},
        "tinkerd_commit": git_commit(Path(__file__).resolve().parents[2]),
        "target": target,
        "sizes": sizes.as_dict(),
        "raw": {"ran": raw_result is not None, "skipped_because": raw_skipped,
                **({k: v for k, v in raw_result.items() if k != "figures"} if raw_result else {})},
        "floor": {"ran": floor_skipped is None, "skipped_because": floor_skipped, "runs": floor_runs,
                  "what": spec.FLOOR_WHAT},
        "ratio": "server median / raw median",
        "overhead_ms": "server median - raw median - SDK floor median, in ms (latency figures)",
        "scaling": "tenants: aggregate tokens/s median / the 1-tenant median",
        "figures": figures,
        "tenants": {"counts": sizes.tenant_list,
                    "scaling": {str(f["key"].split("_")[1]): f["scaling"] for f in figures
                                if f["key"].startswith("tenants_")}},
        "targets": target_results(figures),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(stats: dict | None) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    return f"{_fmt(stats['median'])} [{_fmt(stats['min'])}-{_fmt(stats['max'])}]"


def _machine(result: dict) -> str:
    m = result["machine"]
    return f"{m.get('cpu', '?')}, {m.get('cpu_count')} cores" + (f", {m['accelerator']}" if m.get("accelerator") else "")


def _ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rows(result: dict) -> list[tuple[str, ...]]:
    rows = []
    for f in result["figures"]:
        rows.append((f["workload"], f["key"], f["unit"], _cell(f["server"]), _cell(f["raw"]), _ratio(f["ratio"]),
                     _cell(f.get("floor")), _ratio(f.get("overhead_ms"), 1), _ratio(f.get("scaling"))))
    return rows


HEADER = ("workload", "figure", "unit", "server median [min-max]", "raw median [min-max]", "ratio",
          "SDK floor median [min-max]", "over raw+floor ms", "x 1 tenant")


def _target_value(t: dict) -> str:
    if t["value"] is None:
        return "not measured"
    return f"{t['value']:.1f} ms" if t["measure"] == "overhead_ms" else f"{t['value']:.2f}x"


def _mark(t: dict) -> str:
    return {True: "PASS", False: "MISS", None: "n/a"}[t["pass"]]


def targets_of(result: dict) -> list[dict]:
    """The results file's target checks (recomputed for files from before they were recorded)."""
    return result.get("targets") or target_results(result["figures"])


def table(result: dict) -> str:
    t = result["target"]
    head = (f"tinkerd bench {result['date']} | {_machine(result)} | {t.get('kind')} {t.get('base_model')}"
            f" ({t.get('device', '?')}, {t.get('dtype', '?')}) | LoRA rank {result['sizes']['rank']}"
            f" | commit {result.get('tinkerd_commit')}")
    rows = [HEADER, *_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("ratio = server / raw (medians): tok/s below 1 and ms/s above 1 are slower than raw.")
    pooled = [name for name, part in (("raw", result["raw"]), ("SDK floor", result["floor"])) if part.get("runs") == 2]
    if pooled:
        lines.append(f"{' and '.join(pooled)} = one run before the server and one after it, their samples pooled "
                     "(the machine drifts).")
    lines.append("over raw+floor = server - raw - SDK floor (medians, ms): what the server adds above the best a "
                 "client can see.")
    lines.append("")
    lines.append("targets:")
    for target in targets_of(result):
        lines.append(f"  {_mark(target):4}  {target['target']}: {_target_value(target)}")
    lines.append("")
    lines.extend(_warnings(result))
    return "\n".join(lines).rstrip()


def _warnings(result: dict) -> list[str]:
    lines = []
    busy = result["machine"].get("loadavg", {}).get("busy_before_start")
    if busy is not None and busy > BUSY_WARNING:
        lines.append(f"warning: the CPU was {busy:.0%} busy before the run started (other processes): "
                     "the figures may be noisy")
    if not result["raw"]["ran"]:
        lines.append(f"raw baseline skipped: {result['raw']['skipped_because']}")
    floor = result.get("floor")
    if floor and not floor["ran"]:
        lines.append(f"SDK floor skipped: {floor['skipped_because']}")
    for f in result["figures"]:
        if f.get("note"):
            lines.append(f"note {f['key']}: {f['note']}")
    return lines


def markdown_table(result: dict) -> str:
    """The same tables in Markdown (for the README)."""
    header = ("workload", "figure", "unit", "tinkerd median [min–max]", "raw median [min–max]", "ratio",
              "SDK floor median [min–max]", "over raw + floor (ms)", "× 1 tenant")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in _rows(result):
        cells = [r[0], f"`{r[1]}`", *r[2:]]
        for i in (3, 4, 6):  # the [min-max] cells: an en dash for ranges
            cells[i] = cells[i].replace("-", "–")
        lines.append("| " + " | ".join("–" if c == "-" else c for c in cells) + " |")
    lines += ["", "| target | measured | result |", "|---|---|---|"]
    for target in targets_of(result):
        lines.append(f"| {target['target'].replace('<=', '≤').replace('>=', '≥')} | {_target_value(target)} "
                     f"| **{_mark(target)}** |")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    """One panel per figure: server, raw and SDK floor medians, min-max whiskers; ratio, overhead and
    tenant scaling in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [f for f in result["figures"] if f["server"]["median"] is not None]
    cols = 4
    rows = max(1, -(-len(figures) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(figures):]:
        ax.axis("off")
    for ax, f in zip(axes.flat, figures):
        bars = [("tinkerd" if result["target"].get("kind") == "tinkerd" else "server", f["server"], "tab:blue")]
        if f["raw"] and f["raw"].get("median") is not None:
            bars.append(("raw", f["raw"], "tab:gray"))
        if _median(f.get("floor")) is not None:
            bars.append(("SDK floor", f["floor"], "tab:orange"))
        for i, (label, stats, color) in enumerate(bars):
            med = stats["median"]
            err = [[med - stats["min"]], [stats["max"] - med]]
            ax.bar(i, med, color=color, yerr=err, capsize=6)
            ax.text(i, med, _fmt(med), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars])
        extras = [f"ratio {f['ratio']:.2f}"] if f["ratio"] is not None else []
        if f.get("overhead_ms") is not None:
            extras.append(f"{f['overhead_ms']:+.1f} ms over raw+floor")
        if f.get("scaling") is not None:
            extras.append(f"x{f['scaling']:.2f} vs 1 tenant")
        ax.set_title(f["key"] + (f"\n({', '.join(extras)})" if extras else ""), fontsize=8)
        ax.set_ylabel(f"{f['unit']} ({f['better']} is better)", fontsize=8)
        ax.tick_params(labelsize=8)
    t = result["target"]
    fig.suptitle(f"tinkerd bench {result['date']}: {t.get('base_model')} on {t.get('device', '?')} "
                 f"({_machine(result)}) - median, min-max whiskers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path) -> tuple[Path, Path | None, str | None]:
    """Write bench.json and bench.png; return their paths (PNG None, with the reason, if it failed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / JSON_NAME
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png_path = out_dir / PNG_NAME
    try:
        chart(result, png_path)
    except ImportError as exc:
        return json_path, None, f"no PNG: {exc} (pip install matplotlib)"
    return json_path, png_path, None


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(JSON_NAME)
    result = json.loads(path.read_text())
    print(table(result))
    print()
    print(markdown_table(result))
    if "--png" in sys.argv:
        chart(result, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
