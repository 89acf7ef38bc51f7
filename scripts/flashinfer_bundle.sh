#!/usr/bin/env bash
# Pack FlashInfer's paged-attention path for the GPU machine (no network there, 64 MiB per call).
set -euo pipefail

FI_VERSION=0.7.2.post1
TVM_FFI_VERSION=0.1.15.post2 # flashinfer needs apache-tvm-ffi >=0.1.11,<0.2 at import time
CUDA_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
	nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85) # the GPU machine's nvcc is 13.0
CURAND_WHEEL=nvidia-curand==10.4.0.35                        # CUDA 13.0's; only its headers are kept

usage() {
	cat <<'EOF'
Usage: scripts/flashinfer_bundle.sh [--full] [--prebuild] [--part-mib N] [--python PY]

Run on a CPU machine that reaches PyPI, from the repository root. Downloads flashinfer-python
0.7.2.post1 and apache-tvm-ffi (cp312, the GPU machine's Python) into .fi/whl, unpacks them into
.fi/stage/site, keeps of flashinfer/data only what the JIT of the paged prefill and decode
wrappers reads (traced with PY), adds the cuRAND headers that the sm90 prefill kernels include,
and packs the tree as xz-compressed tar parts of at most N MiB in .fi/parts, named
fi.tar.xz.partIofM. scripts/flashinfer_install.sh joins and unpacks them on the GPU machine.

  --full        keep all of flashinfer/data (no trace)
  --prebuild    also compile the bf16 paged attention modules for sm_90a with nvcc 13.0 from
                PyPI (FA2 prefill and decode for head dims 16, 32, 64, 128; FA3 prefill for 64
                and 128) and put them where FlashInfer loads them without compiling
                (flashinfer/data/aot); the JIT stays the fallback
  --part-mib N  size limit of one part in MiB (default 55)
  --python PY   interpreter that imports torch, used to trace and prebuild (default: python3)
EOF
}

full=0 prebuild=0 part_mib=55 py=python3
while (($#)); do
	case $1 in
	--full) full=1 ;;
	--prebuild) prebuild=1 ;;
	--part-mib) part_mib=$2 && shift ;;
	--python) py=$2 && shift ;;
	-h | --help) usage && exit 0 ;;
	*) echo "unknown argument: $1 (see --help)" >&2 && exit 2 ;;
	esac
	shift
done

root=$PWD/.fi
stage=$root/stage/site
trace=$root/trace      # tvm-ffi and pynvml for the local interpreter (tracing only)
work=$root/work        # FlashInfer's generated sources and build tree on this machine
pip_get=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
	--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
	--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
[[ -f scripts/flashinfer_bundle.sh ]] || { echo "run from the repository root" >&2 && exit 2; }
grep -qx '/.fi/' .git/info/exclude 2>/dev/null || echo '/.fi/' >>.git/info/exclude

echo "== wheels -> .fi/whl"
mkdir -p "$root/whl"
"${pip_get[@]}" -d "$root/whl" "flashinfer-python==$FI_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" "$CURAND_WHEEL"

echo "== unpack -> .fi/stage/site"
rm -rf "$root/stage" "$root/parts" && mkdir -p "$stage" "$root/parts"
unzip -q "$root/whl/flashinfer_python-$FI_VERSION-py3-none-any.whl" -d "$stage"
unzip -q "$root"/whl/apache_tvm_ffi-"$TVM_FFI_VERSION"-cp312-*.whl -d "$stage"
rm -f "$stage"/build_backend.py "$stage"/build_utils.py
mkdir -p "$stage/fi_extra"
unzip -q -j "$root"/whl/nvidia_curand-*.whl 'nvidia/cu13/include/curand*' -d "$stage/fi_extra/include"

if ((full == 0 || prebuild == 1)); then
	"$py" -m pip install -q --no-deps --upgrade --target "$trace" "apache-tvm-ffi==$TVM_FFI_VERSION" nvidia-ml-py ninja
fi
run_py() { # run the helper below with flashinfer from the stage and this machine's tvm-ffi
	PYTHONPATH="$trace:$stage" FLASHINFER_CUDA_ARCH_LIST=9.0 FLASHINFER_WORKSPACE_BASE="$work" \
		PATH="$trace/bin:$PATH" "$py" - "$@" <<'EOF'
import os, re, sys, time
from pathlib import Path

import torch
from flashinfer.jit import env
from flashinfer.jit.attention import modules as m
from flashinfer.jit.cpp_ext import get_cccl_includes, get_system_includes

mode = sys.argv[1]
bf, i32 = torch.bfloat16, torch.int32
specs = []  # what BatchPrefill/BatchDecodeWithPagedKVCacheWrapper build for bf16 on sm90
for hd in (16, 32, 64, 128):  # 16 and 32: the tests' tiny models (FA3 has no such kernels)
    a = (bf, bf, bf, i32, hd, hd, 0, False, False, False)
    specs += [
        m._gen_batch_prefill_primary_module("fa2", *a),  # prefill fa2, decode with tensor cores
        m.gen_batch_decode_module(*a[:-1]),  # decode without tensor cores
    ]
    if hd >= 64:
        specs.append(m.gen_batch_prefill_module("fa3", *a))  # prefill "auto" on sm90
    if mode == "trace":  # built only when K and V strides differ
        specs.append(m._gen_batch_prefill_independent_paged_module("fa2", *a))
if mode == "trace":
    # Every #include reachable from the generated sources (conditionals ignored: a superset).
    dirs = [Path(str(d)) for d in (*get_cccl_includes(), *get_system_includes("/nonexistent"))]
    dirs = [d for d in dirs if d.is_dir()]
    include = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
    seen, todo = set(), [Path(s) for spec in specs for s in spec.sources]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for kind, name in include.findall(f.read_text(errors="replace")):
            for d in ([f.parent] if kind == '"' else []) + dirs:
                if (d / name).is_file():
                    todo.append(Path(os.path.normpath(d / name)))
                    break
    csrc = env.FLASHINFER_CSRC_DIR.resolve()
    # The generators also read the templates and copy host sources and headers from csrc
    # into the generated folders: keep every template and every file copied there.
    gen = Path(env.FLASHINFER_GEN_SRC_DIR).glob("*/*")
    needed = {p.relative_to(csrc) for p in seen if csrc in p.parents}
    needed |= {Path(p.name) for p in csrc.glob("*.jinja")}
    needed |= {Path(p.name) for p in gen if (csrc / p.name).is_file()}
    print("\n".join(sorted(str(p) for p in needed)))
else:  # prebuild: compile each module and place it where get_aot_path() looks first
    for spec in specs:
        t = time.time()
        spec.build()
        dest = Path(env.FLASHINFER_AOT_DIR) / spec.name / f"{spec.name}.so"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(spec.jit_library_path.read_bytes())
        print(f"built {spec.name} in {time.time() - t:.0f} s", flush=True)
EOF
}

if ((full == 0)); then
	echo "== trace the files of flashinfer/data/csrc the paged attention JIT reads"
	rm -rf "$work"
	run_py trace >"$root/csrc_needed.txt"
	echo "   $(wc -l <"$root/csrc_needed.txt") files of csrc kept (list: .fi/csrc_needed.txt)"
	data=$stage/flashinfer/data
	keep=(include cutlass/include cutlass/tools/util/include spdlog/include
		cccl/cub/cub cccl/libcudacxx/include cccl/thrust/thrust)
	mkdir "$data.kept"
	sed 's|^|csrc/|' "$root/csrc_needed.txt" >"$root/csrc_paths.txt"
	(cd "$data" && tar cf - "${keep[@]}" -T "$root/csrc_paths.txt") | tar xf - -C "$data.kept"
	rm -rf "$data" && mv "$data.kept" "$data"
fi

if ((prebuild == 1)); then
	echo "== prebuild with nvcc 13.0 for sm_90a"
	cuda=$root/cuda/nvidia/cu13
	if [[ ! -x $cuda/bin/nvcc ]]; then
		mkdir -p "$root/cuda_whl"
		"${pip_get[@]}" -d "$root/cuda_whl" "${CUDA_WHEELS[@]}"
		for w in "$root"/cuda_whl/*.whl; do unzip -q -o "$w" -d "$root/cuda"; done
		# FlashInfer links with -L$CUDA_HOME/lib64{,/stubs} -lcudart -lcuda: give it those names
		# (an empty libcuda stub; the driver's libcuda.so.1 is loaded where the module runs).
		mkdir -p "$cuda/lib/stubs" && ln -sfn lib "$cuda/lib64"
		ln -sf libcudart.so.13 "$cuda/lib/libcudart.so"
		echo >"$root/empty.c" && cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$root/empty.c"
	fi
	rm -rf "$work"
	CUDA_HOME=$cuda MAX_JOBS=$(nproc) FLASHINFER_EXTRA_CUDAFLAGS="-isystem $stage/fi_extra/include" run_py prebuild
fi

{
	echo "flashinfer-python $FI_VERSION, apache-tvm-ffi $TVM_FFI_VERSION, packed $(date -u +%FT%TZ)"
	echo "flashinfer/data: $( ((full)) && echo all || echo 'paged attention JIT only')"
	echo "prebuilt (flashinfer/data/aot): $(find "$stage/flashinfer/data/aot" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) modules"
} >"$stage/fi_bundle_info.txt"

echo "== pack -> .fi/parts"
tar cf - -C "$stage" . | xz -T0 -6 -c | split -b "${part_mib}M" -d -a 2 - "$root/parts/fi.tar.xz."
parts=("$root"/parts/fi.tar.xz.*)
for i in "${!parts[@]}"; do mv "${parts[i]}" "$root/parts/fi.tar.xz.part$((i + 1))of${#parts[@]}"; done
cat "$stage/fi_bundle_info.txt"
du -b "$root"/parts/* | awk '{printf "%s  %.1f MiB\n", $2, $1 / 1048576}'
