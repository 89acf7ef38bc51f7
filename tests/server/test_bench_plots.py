"""The benchmarks' PNG charts on the demo model: the online rate sweep (latency against
throughput, against a server it launches) and the offline ablation's bar chart (a process per
variant), plus their flag checks and the one-line error when matplotlib is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _bench(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", f"minisgl.bench.{module}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _check_png(path: Path, min_width: int, min_height: int) -> None:
    """A PNG file that matplotlib reads back as a large enough, not blank, image."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img: Any = matplotlib.image.imread(str(path))
    height, width = img.shape[:2]
    assert width >= min_width and height >= min_height, img.shape
    assert float(img[..., :3].std()) > 0.05  # drawn on, not a blank canvas


@pytest.mark.slow
def test_a_sweep_of_two_rates_writes_a_point_each_and_a_latency_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    proc = _bench(
        "online", "--sweep-rates", "5,40", "--num-prompts", "4", "--input-len", "5,30",
        "--output-len", "3,8", "--json", str(out), "--plot", str(png),
        "--max-model-len", "256",  # passed through to `minisgl serve`
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["model"] == "minisgl-demo" and r["rates"] == [5.0, 40.0]
    assert [p["rate"] for p in r["points"]] == [5.0, 40.0]
    assert [p["seed"] for p in r["points"]] == [0, 1]  # fresh prompts for each point
    for p in r["points"]:
        assert p["completed"] == 4 and 3 * 4 <= p["output_tokens"] <= 8 * 4
        assert p["output_tok_s"] > 0
        for key in ("ttft_ms", "itl_ms"):
            assert 0 < p[key]["median"] <= p[key]["p99"]
    _check_png(png, min_width=1000, min_height=450)


@pytest.mark.slow
def test_an_ablation_runs_each_variant_and_draws_its_bars(tmp_path: Path) -> None:
    out, png = tmp_path / "ablation.json", tmp_path / "ablation.png"
    proc = _bench(
        "offline", "--workload", "W2", "--num-prompts", "1", "--no-progress",
        "--max-model-len", "528",  # W2's 512-token prompt leaves room for 16 new tokens
        "--ablate=--disable-radix-cache", "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["workload"]["name"] == "W2" and r["device"] == "cpu"
    variants = r["variants"]
    assert [v["label"] for v in variants] == ["base", "--disable-radix-cache"]
    assert [v["result"]["engine"]["disable_radix_cache"] for v in variants] == [False, True]
    for v in variants:
        assert v["result"]["minisgl"]["output_tokens"] == 16
        assert v["output_tok_s"] == v["result"]["minisgl"]["output_tok_s"] > 0
    _check_png(png, min_width=700, min_height=450)


def test_the_variants_get_every_flag_but_the_ablations_own() -> None:
    from minisgl.bench.offline import _variant_argv

    argv = [
        "--workload", "W2", "--ablate=--disable-radix-cache", "--ablate", "--page-size 4",
        "--json", "a.json", "--plot=a.png", "--hf-baseline", "--num-pages", "64",
    ]  # fmt: skip
    assert _variant_argv(argv) == ["--workload", "W2", "--num-pages", "64"]


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("online", ["--sweep-rates", "1,2", "--plot", "x.png", "--target", "127.0.0.1:1"]),
        ("offline", ["--ablate=--disable-radix-cache", "--plot", "x.png"]),
    ],
)
def test_without_matplotlib_plot_fails_at_once_naming_the_extra(
    module: str, args: list[str], tmp_path: Path
) -> None:
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        f"sys.argv = ['bench', *sys.argv[1:]]; runpy.run_module('minisgl.bench.{module}', "
        "run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --plot: plotting needs matplotlib, the 'plot' extra: pip install 'minisgl[plot]'"
    ]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sweep-rates", "1,0"], "--sweep-rates: every rate must be > 0"),
        (["--sweep-rates", "1,fast"], "--sweep-rates: not a list of numbers"),
        (["--plot", "x.png"], "--plot needs --sweep-rates"),
    ],
)
def test_bad_sweep_flags_are_usage_errors(args: list[str], message: str) -> None:
    proc = _bench("online", "--target", "127.0.0.1:1", *args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_an_ablation_without_flags_is_a_usage_error() -> None:
    proc = _bench("offline", "--ablate=--disable-radix-cache", "--ablate= ", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--ablate: a variant needs at least one engine flag" in proc.stderr
