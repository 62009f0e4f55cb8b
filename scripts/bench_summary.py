"""Combine the settings of one scripts/bench_gpu.sh run into one JSON and one table; exit 1 if any failed.

    python scripts/bench_summary.py PARTS_DIR --expect fp32 bf16 bf16_cl bf16_cl_compile --json OUT.json

PARTS_DIR holds, per setting NAME, NAME.json (written by scripts/bench.py, possibly partial) and NAME.rc
(its exit status). A setting failed when its status is not 0 (124/137: stopped at its time cap), its
JSON is missing or incomplete, or a way in it failed; whatever it measured is still shown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

WAYS = ("plain_index", "plain_loader", "engine", "cached", "student_alone")
GOAL_MINUTES = 10.0  # the 240-epoch CIFAR-100 recipe on one H200


def read_part(parts: Path, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the setting's JSON or None, why it failed or None)."""
    rc_file, json_file = parts / f"{name}.rc", parts / f"{name}.json"
    rc = int(rc_file.read_text().strip()) if rc_file.is_file() else None
    try:
        part = json.loads(json_file.read_text())
    except (OSError, ValueError):
        part = None
    problems = []
    if rc is None:
        problems.append("did not run")
    elif rc in (124, 137):
        problems.append(f"stopped at its time cap (exit {rc})")
    elif rc != 0:
        problems.append(f"exit {rc}")
    if part is None:
        problems.append("no JSON")
    else:
        if not part.get("complete"):
            problems.append("incomplete")
        problems += [f"{way}: {err}" for way, err in part.get("errors", {}).items()]
    return part, "; ".join(problems) or None


def table(parts: dict[str, dict[str, Any]]) -> list[str]:
    head = f"{'setting':<17}{'way':<15}{'images/s':>10}{'ms/step':>9}{'vs plain_index':>16}{'vs alone':>10}"
    lines = [head + f"{'240-epoch run':>15}"]
    for name, part in parts.items():
        res = part.get("results", {})
        plain = res.get("plain_index", {}).get("epoch_seconds")
        alone = res.get("student_alone", {}).get("epoch_seconds")
        for way in WAYS:
            if way not in res:
                continue
            r = res[way]
            vs_plain = f"{plain / r['epoch_seconds']:.2f}x" if plain else "-"
            vs_alone = f"{r['epoch_seconds'] / alone:.2f}" if alone and way != "student_alone" else "-"
            lines.append(
                f"{name:<17}{way:<15}{r['samples_per_sec']:>10,.0f}{r['ms_per_step']:>9.2f}{vs_plain:>16}"
                f"{vs_alone:>10}{r['projected_minutes']:>12.1f} min"
            )
    return lines


def notes(parts: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, part in parts.items():
        if "cache_build_seconds" in part:
            lines.append(
                f"{name}: teacher cache of {part.get('cache_views', 0)} views built in "
                f"{part['cache_build_seconds']:.1f} s (once per teacher and data set)"
            )
        for way, got in part.get("syncs", {}).items():
            per = ", ".join(f"{k} {v:g}" for k, v in got["per_step"].items())
            lines.append(f"{name}: host syncs per step, {way}: {per}")
        for way, prof in part.get("profile", {}).items():
            busy = prof.get("device_busy_seconds")
            share = f", device busy {busy / prof['wall_seconds']:.0%} of the wall time" if busy is not None else ""
            lines.append(f"{name}: top kernels (CPU: ops) of {way} over {prof['steps']} steps{share}:")
            lines += [
                f"    {e['self_seconds'] * 1e3:9.2f} ms {e['count']:6d}x  {e['name'][:90]}" for e in prof["top"][:6]
            ]
    best = [
        (r["projected_minutes"], name, way, part.get("device_name", "?"))
        for name, part in parts.items()
        for way, r in part.get("results", {}).items()
        if way in ("engine", "cached") and part.get("recipe_epochs") == 240
    ]
    if best:
        minutes, name, way, device = min(best)
        verdict = "meets" if minutes <= GOAL_MINUTES else "misses"
        lines.append(
            f"fastest distillation on {device}: {name} / {way}, {minutes:.1f} min projected for 240 epochs "
            f"({verdict} the {GOAL_MINUTES:g}-minute goal on one H200)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", type=Path, help="the folder with NAME.json and NAME.rc per setting")
    ap.add_argument("--expect", nargs="+", required=True, help="the settings that should have run, in order")
    ap.add_argument("--json", type=Path, required=True, help="the combined JSON to write")
    args = ap.parse_args(argv)
    parts: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for name in args.expect:
        part, problem = read_part(args.parts, name)
        if part is not None:
            parts[name] = part
        if problem:
            failed[name] = problem
    lines = table(parts) + [""] + notes(parts)
    print("\n".join(lines))
    for name, problem in failed.items():
        print(f"FAILED {name}: {problem}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": parts, "failed": failed, "table": lines}, indent=2) + "\n")
    print(f"wrote {args.json}")
    if failed:
        print(f"{len(failed)} of {len(args.expect)} settings failed (see above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
