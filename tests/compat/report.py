"""The SDK compatibility results as Markdown tables (the README's table comes from here).

    python -m tests.compat.report RESULTS.jsonl [--extras]

RESULTS.jsonl holds one core_flow.py report per line, as tests/e2e/test_sdk_compat.py
writes them (each may carry "install_s" and "venv_mib" from tests/compat/venvs.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CORE_COLUMNS = (("create", "create"), ("fwd_bwd", "fwd/bwd"), ("optim", "optim"),
                ("save_for_sampler", "save for sampler"), ("sample", "sample"),
                ("compute_logprobs", "compute_logprobs"))
EXTRA_COLUMNS = (("get_info", "get_info"), ("save_named_for_sampler", "save_weights_for_sampler(name)"),
                 ("sample_from_path", "sampling client from path"),
                 ("sample_from_base_model", "sampling client from base model"),
                 ("save_state", "save_state"), ("load_state", "load_state"), ("forward", "forward"))
_MARKS = {"ok": "✓", "error": "✗", "skipped": "–", "n/a": "n/a"}


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in version.split("."))


def _cell(result: dict, table: str, step: str) -> str:
    status = result.get(table, {}).get(step, "skipped")
    mark = _MARKS.get(status, status)
    if status == "error":
        error = result.get("errors", {}).get(step, "")
        mark += f" {error[:80]}".replace("|", "\\|").rstrip()
    return mark


def _losses(result: dict) -> str:
    return " → ".join(f"{loss:.2f}" for loss in result.get("losses", [])) or "–"


def markdown_table(results: list[dict], extras: bool = False) -> str:
    results = sorted(results, key=lambda r: _version_key(r.get("sdk_version", "0")))
    columns = EXTRA_COLUMNS if extras else CORE_COLUMNS
    table = "extras" if extras else "steps"
    header = ["SDK", *(title for _, title in columns)]
    if not extras:
        header += ["loss:sum per step", "venv"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        row = [f"`{result.get('sdk_version', '?')}`", *(_cell(result, table, step) for step, _ in columns)]
        if not extras:
            venv = "–"
            if result.get("venv_mib") is not None:
                venv = f"{result['venv_mib']:.0f} MiB, built in {result.get('install_s', 0):.0f} s"
            row += [_losses(result), venv]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def read_results(paths: list[str]) -> list[dict]:
    results = []
    for path in paths:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        results += [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="JSON-lines files of core_flow.py reports ('-': stdin)")
    parser.add_argument("--extras", action="store_true", help="also print the table of the extra calls")
    args = parser.parse_args()
    results = read_results(args.results)
    print(markdown_table(results))
    if args.extras:
        print()
        print(markdown_table(results, extras=True))


if __name__ == "__main__":
    main()
