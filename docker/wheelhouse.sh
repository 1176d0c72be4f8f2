#!/usr/bin/env bash
# Make the wheelhouse an image installs from with `pip install --no-index` (air-gapped builds).
#
#   docker/wheelhouse.sh cpu    docker/wheelhouse/cpu: torch (CPU build) and every other dependency
#   docker/wheelhouse.sh gpu    docker/wheelhouse/gpu: every dependency but torch, which the CUDA
#                               base image brings (set GPU_PYTHON, default 3.11, to its Python version)
#
# Run it from the repository root on any machine with a package index (or a mirror of one) and
# the target's Python (cpu), then carry docker/wheelhouse/ to the build host. It writes
# requirements.txt with the exact versions, which the Dockerfiles install.
set -euo pipefail
cd "$(dirname "$0")/.."

kind="${1:-cpu}"
out="docker/wheelhouse/$kind"
torch_version="${TORCH_VERSION:-2.13.0}"
python="${PYTHON:-python3}"

case "$kind" in
  cpu)
    # On x86_64 PyPI's plain torch is the CUDA build (GBs of nvidia wheels); the CPU build comes
    # from PyTorch's CPU index (a pip configured with find-links may already hold it).
    rm -rf "$out" && mkdir -p "$out"
    extra=()
    if [ -n "${TORCH_CPU_INDEX:-}" ]; then extra=(--extra-index-url "$TORCH_CPU_INDEX"); fi
    "$python" -m pip wheel --quiet --wheel-dir "$out" "${extra[@]}" ".[certs,metrics]" "torch==$torch_version" setuptools wheel
    rm -f "$out"/fedmeta-*.whl
    if ls "$out"/nvidia_* > /dev/null 2>&1; then
      echo "wheelhouse.sh: the torch that pip chose is a CUDA build ($(ls "$out"/torch-*.whl)); for the CPU image" \
           "set TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" >&2
      exit 1
    fi
    ;;
  gpu)
    rm -rf "$out" && mkdir -p "$out"
    py="${GPU_PYTHON:-3.11}"
    mapfile -t deps < <("$python" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
deps = project["dependencies"] + extras["certs"] + extras["metrics"]  # metrics: --metrics-port (one small wheel)
print("\n".join(d for d in deps if re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() != "torch"))
EOF
)
    "$python" -m pip download --quiet --dest "$out" --only-binary=:all: --python-version "$py" \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      "${deps[@]}" setuptools wheel
    ;;
  *)
    echo "usage: docker/wheelhouse.sh cpu|gpu" >&2
    exit 2
    ;;
esac

# requirements.txt: name==version of every wheel, from the file names (PEP 427).
"$python" - "$out" <<'EOF'
import pathlib, sys
out = pathlib.Path(sys.argv[1])
pins = sorted({"==".join(w.name.split("-")[:2]) for w in out.glob("*.whl")}, key=str.lower)
(out / "requirements.txt").write_text("\n".join(pins) + "\n")
EOF
echo "wheelhouse.sh: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out"
