#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it (not editable) with the CPU runtime and the
# gate's extra into a fresh venv that has no torch, and run the installed CLI there, from outside the
# repository and from its root (where a folder named like the package would shadow it).
#
#   tests/smoke_wheel.sh [DEV_PYTHON]     (default: .venv/bin/python; `make smoke-wheel` passes VENV's)
#
# DEV_PYTHON (the venv `make install` made) builds the wheel and exports the seeded tiny-random engine the
# smoke screens with: the exporter needs torch, which the wheel's venv must not have. Everything happens in a
# temporary folder, removed at the end; the network is used only by pip, for the runtime's dependencies.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEV_PYTHON="${1:-$REPO/.venv/bin/python}"
IMAGE="$REPO/examples/astronaut.jpg"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/safeclip-smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

step() { printf 'smoke_wheel: %s\n' "$*"; }
fail() { printf 'smoke_wheel: FAILED: %s\n' "$*" >&2; exit 1; }

step "building the sdist, and the wheel from it"
# As a release is built: the wheel from the unpacked sdist, so nothing left in the repository's build/
# folder by an earlier build can slip into it. From outside the repository: run inside it, `python -m build`
# would import that build/ folder as the `build` package. --no-isolation: DEV_PYTHON's setuptools, offline.
(cd "$WORK" && "$DEV_PYTHON" -m build --no-isolation --outdir "$WORK/dist" "$REPO" >"$WORK/build.log" 2>&1) \
    || { tail -n 40 "$WORK/build.log" >&2; fail "python -m build"; }
WHEELS=("$WORK"/dist/safeclip-*.whl)
[ "${#WHEELS[@]}" -eq 1 ] && [ -f "${WHEELS[0]}" ] || fail "expected one wheel in $WORK/dist, found: ${WHEELS[*]}"
WHEEL="${WHEELS[0]}"
VERSION="$(basename "$WHEEL" | cut -d- -f2)"

step "exporting the tiny-random engine with $DEV_PYTHON"
HF_HUB_OFFLINE=1 "$DEV_PYTHON" -m safeclip.export --model tiny-random --out "$WORK/engine" --precision fp32 \
    >"$WORK/export.log" 2>&1 || { tail -n 40 "$WORK/export.log" >&2; fail "safeclip export"; }

step "installing $(basename "$WHEEL")[cpu,serve] into a fresh venv"
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install --quiet --disable-pip-version-check "$WHEEL[cpu,serve]" || fail "pip install the wheel"
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)' \
    || fail "torch is installed in the wheel's venv: the runtime must not need it"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ ! -e "$SITE/__editable__.safeclip-$VERSION.pth" ] || fail "the install is editable"

cd "$WORK"  # not the repository: nothing of it on the path
SAFECLIP="$WORK/venv/bin/safeclip"

step "safeclip --version"
got="$("$SAFECLIP" --version)" || fail "safeclip --version exited $?"
[ "$got" = "safeclip $VERSION" ] || fail "safeclip --version printed '$got', not 'safeclip $VERSION'"

step "safeclip screen $IMAGE"
# Threshold 1 flags nothing and 0 flags everything: the exit status then says the image was screened,
# whatever the random engine makes of it (2 would mean it was not).
status=0; "$SAFECLIP" screen --engine "$WORK/engine" --threshold 1 "$IMAGE" >"$WORK/screen.out" || status=$?
[ "$status" -eq 0 ] || fail "screen at threshold 1 exited $status (expected 0, clean): $(cat "$WORK/screen.out")"
status=0; "$SAFECLIP" screen --engine "$WORK/engine" --threshold 0 --json "$IMAGE" >"$WORK/screen.json" || status=$?
[ "$status" -eq 1 ] || fail "screen at threshold 0 exited $status (expected 1, flagged): $(cat "$WORK/screen.json")"
"$PY" - "$WORK/screen.json" "$IMAGE" <<'EOF' || fail "screen --json output"
import json, sys
[line] = open(sys.argv[1]).read().splitlines()
record = json.loads(line)
assert record["path"] == sys.argv[2] and record["flagged"] is True and 0 <= record["probability"] <= 1, record
EOF

step "the README's Python snippet, run from the repository root"
(cd "$REPO" && "$PY" - "$WORK/engine" "$IMAGE" "$SITE" <<'EOF') || fail "from safeclip import Gate, from the repository root"
import sys
import safeclip
from safeclip import Gate

assert safeclip.__file__.startswith(sys.argv[3]), f"safeclip imported from {safeclip.__file__}, not the wheel"
gate = Gate.from_engine(sys.argv[1])
(verdict,) = gate.check([sys.argv[2]])
print("smoke_wheel:", verdict.flagged, verdict.category, round(verdict.probability, 3))
EOF

step "safeclip serve: /readyz and one screened request"
"$PY" "$REPO/tests/smoke_serve.py" "$WORK/engine" "$IMAGE" || fail "safeclip serve"

step "ok: the wheel installs without torch and its CLI screens and serves"
