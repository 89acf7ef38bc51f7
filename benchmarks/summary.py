"""Print the headline figures of offline-benchmark JSON files (used on the GPU machine)."""

import json
import sys
from pathlib import Path

for path in sys.argv[1:]:
    r = json.loads(Path(path).read_text())
    m = r["minisgl"]
    line = (
        f"{path}: {r['device']} {r['model']} {r['workload']['name']} "
        f"{m['output_tok_s']:.0f} tok/s, wall {m['wall_s']:.2f} s, steps {m['steps']}, "
        f"copy {r['copy_bandwidth_gb_s']:.0f} GB/s"
    )
    if "roofline_pct" in r:
        line += (
            f", batch-1 {m['decode_tok_s_batch1']:.1f} tok/s = {r['roofline_pct']:.1f}% roofline"
        )
    if "hf" in r:
        line += f", HF {r['hf']['output_tok_s']:.0f} tok/s, x{r['speedup_vs_hf']:.1f}"
    print(line)
    for name, p in m["phases"].items():
        if p["steps"]:
            print(f"    {name}: {p['steps']} steps, {p['wall_s']} s, {p['ms_per_step']} ms/step")
    print("    slowest steps (ms, running):", m.get("slowest_steps_ms_running"))
