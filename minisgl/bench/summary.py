"""The headline figures of offline-benchmark result files, one block per file.

    python -m minisgl.bench.summary w1.json w4.json

Reads the JSON that `python -m minisgl.bench.offline --json FILE` writes and prints output
tok/s, wall time, steps and copy bandwidth; the roofline share (W4) and the HF speed-up
(--hf-baseline) when the run has them; then the time per phase and the slowest steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def summarize(name: str, r: dict[str, Any]) -> list[str]:
    """The lines printed for result `r` (read from the file called `name`)."""
    m = r["minisgl"]
    line = (
        f"{name}: {r['device']} {r['model']} {r['workload']['name']} "
        f"{m['output_tok_s']:.0f} tok/s, wall {m['wall_s']:.2f} s, steps {m['steps']}, "
        f"copy {r['copy_bandwidth_gb_s']:.0f} GB/s"
    )
    if "roofline_pct" in r:
        line += (
            f", batch-1 {m['decode_tok_s_batch1']:.1f} tok/s = {r['roofline_pct']:.1f}% roofline"
        )
    if "hf" in r:
        line += f", HF {r['hf']['output_tok_s']:.0f} tok/s, x{r['speedup_vs_hf']:.1f}"
    lines = [line]
    for phase, p in m["phases"].items():
        if p["steps"]:
            lines.append(
                f"    {phase}: {p['steps']} steps, {p['wall_s']} s, {p['ms_per_step']} ms/step"
            )
    lines.append(f"    slowest steps (ms, running): {m.get('slowest_steps_ms_running')}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("files", nargs="+", help="result files of minisgl.bench.offline --json")
    args = ap.parse_args(argv)
    for path in args.files:
        print("\n".join(summarize(path, json.loads(Path(path).read_text()))))


if __name__ == "__main__":
    main()
