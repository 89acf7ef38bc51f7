#!/usr/bin/env bash
# On the GPU machine: join the FlashInfer bundle's parts under /tmp and unpack it into /tmp/site.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: scripts/flashinfer_install.sh [PART_DIR]

Run on the GPU machine, from the repository root. Copies the bundle parts that this call
carries (fi.tar.xz.partIofM in PART_DIR, default .fi/parts) to /tmp/fi_parts, where they stay
for the next call on the same warm machine. Once all M parts are there it joins them, unpacks
the tree into /tmp/site (once per bundle), writes /tmp/fi_env.sh and imports flashinfer.
Later commands run `. /tmp/fi_env.sh` first: it sets PYTHONPATH, CUDA_HOME, FlashInfer's
build cache (/tmp/fi_ws) and, where the CUDA toolkit lacks them, the cuRAND headers and the
libcudart.so / libcuda.so names that FlashInfer's JIT compiles and links with.

FI_PARTS, FI_SITE and FI_ENV replace /tmp/fi_parts, /tmp/site and /tmp/fi_env.sh (for a
trial run elsewhere).

Exit status: 0 installed; 3 parts still missing (carry the next one in the next call, at
once: the machine stays warm for about 30 s); anything else: a failure, printed.
Made by scripts/flashinfer_bundle.sh.
EOF
}
[[ ${1:-} == -h || ${1:-} == --help ]] && usage && exit 0

src=${1:-.fi/parts}
parts=${FI_PARTS:-/tmp/fi_parts}
site=${FI_SITE:-/tmp/site}
env_file=${FI_ENV:-/tmp/fi_env.sh}
mkdir -p "$parts" "$site"
shopt -s nullglob
carried=("$src"/fi.tar.xz.part*of*)
if ((${#carried[@]})); then
	total=${carried[0]##*of}
	for p in "$parts"/fi.tar.xz.part*of*; do [[ ${p##*of} == "$total" ]] || rm -f "$p"; done
	cp -f "${carried[@]}" "$parts/"
fi
have=("$parts"/fi.tar.xz.part*of*)
((${#have[@]})) || { echo "no bundle part in $src nor in $parts" >&2 && exit 2; }
total=${have[0]##*of}
ordered=()
for ((i = 1; i <= total; i++)); do
	f=$parts/fi.tar.xz.part${i}of$total
	[[ -f $f ]] || { echo "have ${#have[@]} of $total parts in $parts; carry part $i next" && exit 3; }
	ordered+=("$f")
done

stamp=$(du -b "${ordered[@]}")
if [[ ! -f $site/.fi_bundle || $(cat "$site/.fi_bundle") != "$stamp" ]]; then
	rm -rf "$site/flashinfer" "$site/tvm_ffi" "$site/fi_extra" "$site"/flashinfer_python-* "$site"/apache_tvm_ffi-*
	cat "${ordered[@]}" | xz -dc -T0 | tar xf - -C "$site"
	echo "$stamp" >"$site/.fi_bundle"
fi

# CUDA toolkit: nvcc on PATH, else /usr/local/cuda, else the pip layout (nvidia/cu13); its home
# is where nvcc itself runs from (a wrapper script on PATH may point elsewhere).
nvcc=$(command -v nvcc || true)
[[ -n $nvcc ]] || nvcc=$(ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
[[ -n $nvcc ]] || nvcc=$(python3 -c 'import nvidia, pathlib; print(next(p for d in nvidia.__path__ for p in pathlib.Path(d).glob("cu1*/bin/nvcc")))' 2>/dev/null || true)
here=$("${nvcc:-false}" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1 || true)
cuda_home=${CUDA_HOME:-${here:+$(dirname "$here")}}
links=$(dirname "$site")/fi_lib
mkdir -p "$links"
extra_ld="" extra_cuda=""
find_lib() { # first file named $1* in the toolkit, the pip CUDA packages or the loader's cache
	{ for f in "$cuda_home"/{lib64,lib64/stubs,lib,targets/x86_64-linux/lib,targets/x86_64-linux/lib/stubs}/"$1"* \
		/usr/local/nvidia/lib64/"$1"* /usr/lib/x86_64-linux-gnu/"$1"*; do
		echo "$f"
	done
	python3 -c 'import nvidia, pathlib, sys; [print(p) for d in nvidia.__path__ for p in pathlib.Path(d).glob("*/lib/" + sys.argv[1] + "*")]' "$1" 2>/dev/null
	ldconfig -p 2>/dev/null | awk -v n="$1" '$1 ~ "^"n {print $NF}'; } | head -1
}
for lib in libcudart.so libcuda.so; do
	if [[ ! -e $cuda_home/lib64/$lib && ! -e $cuda_home/lib64/stubs/$lib ]]; then
		found=$(find_lib "$lib" || true)
		if [[ -n $found ]]; then
			ln -sf "$found" "$links/$lib"
		elif [[ $lib == libcuda.so ]]; then # link-time stand-in; the driver's is loaded at run time
			echo >"$links/empty.c" && cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/$lib" "$links/empty.c"
		fi
		[[ -e $links/$lib ]] && extra_ld="-L$links"
	fi
done
if ! ls "$cuda_home"/include/curand_kernel.h "$cuda_home"/targets/x86_64-linux/include/curand_kernel.h >/dev/null 2>&1; then
	extra_cuda="-isystem $site/fi_extra/include" # the bundle's cuRAND headers (CUDA 13.0)
fi

{
	echo "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
	echo "export FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws TVM_FFI_CACHE_DIR=/tmp/fi_ws/tvm-ffi MAX_JOBS=$(nproc)"
	[[ -z $cuda_home ]] || echo "export CUDA_HOME=$cuda_home PATH=$cuda_home/bin:\$PATH"
	[[ -z $extra_ld ]] || echo "export FLASHINFER_EXTRA_LDFLAGS='$extra_ld'"
	[[ -z $extra_cuda ]] || echo "export FLASHINFER_EXTRA_CUDAFLAGS='$extra_cuda'"
} >"$env_file"
# shellcheck disable=SC1090
. "$env_file"
cat "$site/fi_bundle_info.txt"
echo "nvcc: ${nvcc:-not found} ($("${nvcc:-false}" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo '-'))"
echo "env ($env_file):" && sed 's/^/  /' "$env_file"
python3 -c "import flashinfer, torch; print('flashinfer', flashinfer.__version__, '| torch DLPack C exchange API:', hasattr(torch.Tensor, '__dlpack_c_exchange_api__'))"
