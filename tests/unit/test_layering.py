"""Import-level promises: the gRPC frontend and the HTTP gateway never import torch, the CPU
path never triton."""

from __future__ import annotations

import subprocess
import sys


def _imported_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout.split()


def test_frontend_process_modules_do_not_import_torch() -> None:
    statement = (
        "import minisgl, minisgl.cli, minisgl.server.launcher, minisgl.server.frontend; "
        "import minisgl.server.sglang_service, minisgl.server.health_check; "
        "import minisgl.gateway.app; minisgl.gateway.app.build_app('127.0.0.1:1'); "
        "minisgl.cli.build_parser()"
    )
    assert _imported_after(statement, ("torch", "transformers")) == []


def test_cpu_engine_does_not_import_triton() -> None:
    statement = (
        "from minisgl import LLM, SamplingParams; "
        "LLM(progress=False, num_pages=64).generate('hi', SamplingParams(max_new_tokens=2))"
    )
    assert _imported_after(statement, ("triton", "torch")) == ["torch"]


def test_collecting_the_gpu_tests_does_not_build_the_kernels() -> None:
    """Kernel modules imported at collection would be compiled-mode for the whole session and
    break the CPU interpreter tests (they set TRITON_INTERPRET when they are imported)."""
    statement = (
        "import pkgutil, importlib, tests.gpu; "
        "[importlib.import_module('tests.gpu.' + m.name) "
        "for m in pkgutil.iter_modules(tests.gpu.__path__)]"
    )
    kernels = ("minisgl.kernels.attention", "minisgl.kernels.fused", "minisgl.kernels.sampling")
    assert _imported_after(statement, kernels) == []
