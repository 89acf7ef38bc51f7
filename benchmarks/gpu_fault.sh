#!/usr/bin/env bash
# Run a command on the GPU machine; if it fails, print what the driver logged about the fault.
#
#   bash benchmarks/gpu_fault.sh python -m minisgl.bench.offline --dummy-weights --workload W3 ...
#
# Each device call is a freshly booted VM, so the kernel log holds only this call's Xid lines:
# Xid 13 (SM exception: which kernel-side error), Xid 31 (MMU fault: the faulting address and
# engine -- GRAPHICS/GPC means a kernel on an SM, CE means a copy engine, i.e. a memcpy), Xid
# 43/45 (channel killed), Xid 48/63/64/94/95 (ECC, remapping: hardware). That tells a wild
# kernel access from a bad copy from a flaky card, which the CUDA error string cannot.
set -uo pipefail
"$@"
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "== exit status $rc; driver log:"
    dmesg 2>&1 | grep -iE "xid|mmu|nvrm: .*fault|sm exception|warp" | tail -40
    nvidia-smi -q -d ECC,ROW_REMAPPER 2>&1 | grep -iE "uncorr|pending|failure" | head -12
fi
exit "$rc"
