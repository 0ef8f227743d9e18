"""Turn a pytest-benchmark JSON file into the markdown tables of RESULTS.md.

    pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json

One table per group: a row per (streams, impl) with tokens/s = extra_info["tokens"] / mean, the mean round
time, any medians the benchmark recorded (TTFT), and each impl's ratio to the group's reference impl measured
in the same run.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

REFERENCE = {"detok": "decodestream", "decode": "eager", "engine": "sequential", "e2e": "seed"}
TTFT_KEYS = ("median_ttft_s", "ttft_median_s")


def rows(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "tokens" not in info:
            continue
        mean = bench["stats"]["mean"]
        ttft = next((info[k] for k in TTFT_KEYS if k in info), None)
        groups[bench.get("group") or "ungrouped"].append({
            "impl": info.get("impl", bench["name"]), "streams": info.get("streams", ""), "tokens": info["tokens"],
            "mean": mean, "tokens_per_s": info.get("tokens_per_s") or info["tokens"] / mean, "ttft": ttft})
    return groups


def table(group: str, entries: list[dict]) -> str:
    ref_impl = REFERENCE.get(group, "-")
    reference = {e["streams"]: e["tokens_per_s"] for e in entries if e["impl"] == ref_impl}
    lines = [f"### group `{group}`", "",
             f"| streams | impl | tokens/round | mean round (s) | tokens/s | median TTFT (ms) | vs {ref_impl} |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for e in sorted(entries, key=lambda e: (e["streams"] if isinstance(e["streams"], int) else 0, e["impl"])):
        ratio = reference.get(e["streams"])
        ttft = "" if e["ttft"] is None else f"{e['ttft'] * 1000:.1f}"
        versus = f"{e['tokens_per_s'] / ratio:.2f}x" if ratio else ""
        lines.append(f"| {e['streams']} | {e['impl']} | {e['tokens']:,} | {e['mean']:.4f} | "
                     f"{e['tokens_per_s']:,.0f} | {ttft} | {versus} |")
    return "\n".join(lines)


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
          f"{machine.get('cpu', {}).get('count', '?')} cores, Python {machine.get('python_version', '?')}; "
          f"{data.get('datetime', '')[:10]}\n")
    for group, entries in sorted(rows(data).items()):
        print(table(group, entries) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
