#!/usr/bin/env bash
# One-GPU speed check of the DFER-CLIP training step (issue 8), in about 7.5 minutes.
#
#   bash benchmarks/gpu_check.sh        # from the repository root; results in $OUT
#
# Runs `python -m dfer_clip_jax.benchmarks.train_step` for B/32 and B/16 at 16 frames, batch 48,
# bfloat16 and float32 (true fp32: matmul precision "highest"), without and with remat of the
# image-tower blocks (8 runs, bfloat16 first; the bfloat16 runs without remat also with XLA's
# attention in place of cuDNN's, for comparison), then, while time is left, the largest
# per-device batch of B/16 bfloat16 without and with remat and the B/16 bfloat16 evaluation
# step. A tiny smoke run checks the environment first. Every run has its own time limit and
# the whole script a budget (BUDGET_S seconds, default 450); a run that fails, runs out of
# memory or out of time is recorded as such and the script goes on.
#
# Installs nothing from the network. The image's python3 brings jax (with CUDA), flax, optax
# and orbax; the wheels in .whl/ (grain, array_record, portpicker, ml_collections: the trainer
# imports them) are installed into $SITE (default /tmp/site) when present. If the image's
# flax, optax or orbax cannot run the model, the pinned ones in .whl/fallback/ are tried.
# To make .whl/ (git-ignored through .git/info/exclude; ~7 MB), on a machine with pip:
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64"
#   pip download $P -d .whl grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker
#   pip download $P -d .whl/fallback flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
#
# Output ($OUT, default /tmp/gpu_check): results.json (every record, one list), summary.md
# (the table), log.txt (everything printed). The table is printed last.

set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu_check}
BUDGET_S=${BUDGET_S:-450}
PY=${PYTHON:-python3}
RUNS=/tmp/gpu_check_runs   # one JSON per run; collected into $OUT after each run
WORK=/tmp/gpu_check_work   # the demo tokenizer, built once
SITE=${SITE:-/tmp/site}    # where the carried wheels are installed
mkdir -p "$OUT" "$RUNS" "$WORK"
rm -f "$RUNS"/*.json
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))

export PYTHONUNBUFFERED=1
# The usual training setting: most of the GPU's memory for XLA's pool (JAX's default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# A persistent compilation cache also turns on XLA's per-fusion autotuning cache, so later
# runs reuse the kernel choices of earlier ones (compile_s is then shorter than a cold start).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || echo "WARNING: installing .whl/*.whl failed"
  export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
$PY - <<'EOF' || true
import importlib, jax
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections"):
  try:
    print(f"{name} {importlib.import_module(name).__version__}")
  except Exception as err:  # pylint: disable=broad-except
    print(f"{name}: {type(err).__name__}: {err}")
print("devices", jax.devices())
EOF

collect() {
  $PY -m dfer_clip_jax.benchmarks.report "$RUNS" --json="$OUT/results.json" \
    --md="$OUT/summary.md" > /dev/null 2>&1 || echo "WARNING: collecting the results failed"
}

# bench NAME LIMIT_S ARGS...: one benchmark run in its own process, at most LIMIT_S seconds and
# never past the deadline; writes $RUNS/NAME.json (a stub record if the run wrote none).
bench() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  if ((left < 45)); then
    echo "== SKIP $name: ${left}s of the budget left"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" $PY -m dfer_clip_jax.benchmarks.train_step --workdir="$WORK" \
    --json="$RUNS/$name.json" "$@" > "$RUNS/$name.out" 2>&1
  local rc=$?
  # The run's log without its JSON record (printed indented) and without its one-row table.
  grep -v -e '^ ' -e '^[{}]' -e '^|' -e '^Device:' -e '^$' "$RUNS/$name.out" | tail -n 15
  echo "== $name: exit $rc after $(($(date +%s) - t0))s"
  if [ ! -s "$RUNS/$name.json" ]; then
    $PY - "$RUNS/$name.json" "$rc" "$@" <<'EOF'
import json, sys
path, rc, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
record = {"status": "timeout" if rc in (124, 137) else f"crash (exit {rc})", "args": args}
for a in args:
  key, _, value = a.lstrip("-").partition("=")
  record[key] = value or True
json.dump(record, open(path, "w"), indent=2)
EOF
  fi
  $PY - "$RUNS/$name.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
line = f"== result: {r.get('status')}"
for key, fmt in (("clips_per_s", "{:.1f} clips/s"), ("step_ms_pipelined", "{:.1f} ms/step"),
                 ("mfu", "MFU {:.1%}"), ("peak_memory_gb", "peak {:.1f} GB"),
                 ("compile_s", "compile {:.0f} s"), ("attention_used", "attention {}"),
                 ("max_batch_per_device", "max batch/device {}")):
  if r.get(key) is not None:
    line += ", " + fmt.format(r[key])
print(line)
if r.get("attention_sites"):
  print("== attention: " + ", ".join(f"{k}: {v}" for k, v in r["attention_sites"].items()))
for key in ("error", "attention_fallback_error"):
  if r.get(key):
    print(f"== {key}: {str(r[key])[:600]}")
EOF
  collect
  return 0
}

status_of() {
  $PY -c "import json,sys; print(json.load(open(sys.argv[1])).get('status'))" "$1" 2>/dev/null
}

COMMON=(--frames=16 --batch=48 --mode=train --steps=10 --warmup=2)
SLOW=(--frames=16 --batch=48 --mode=train --steps=5 --warmup=1)  # B/16 in true fp32: ~1 s/step

echo "== smoke test (tiny model, XLA attention)"
SMOKE=(--variant=tiny --frames=2 --batch=8 --dtype=bfloat16 --attention=xla --steps=2 --warmup=1)
bench smoke 120 "${SMOKE[@]}"
if [ "$(status_of "$RUNS/smoke.json")" != ok ] && compgen -G ".whl/fallback/*.whl" > /dev/null; then
  echo "== smoke test failed with the image's packages: trying the pinned flax/optax/orbax"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE-fallback" .whl/fallback/*.whl && export PYTHONPATH=$SITE-fallback:$PYTHONPATH
  bench smoke 120 "${SMOKE[@]}"
fi
if [ "$(status_of "$RUNS/smoke.json")" != ok ]; then
  echo "== smoke test failed: see $RUNS/smoke.out above; stopping"
  collect
  cat "$OUT/summary.md" 2>/dev/null
  exit 1
fi

# bfloat16 first (the issue's targets), then float32; B/16 float32 without remat may not fit.
# The limits are generous (a cold compile can be slow); the budget bounds the whole.
bench b32_bf16_none 150 --variant=B/32 --dtype=bfloat16 --remat=none "${COMMON[@]}"
bench b16_bf16_none 150 --variant=B/16 --dtype=bfloat16 --remat=none "${COMMON[@]}"
# The same two with XLA's attention everywhere: what cuDNN's fused attention (on sequences padded
# to an even length) is worth.
bench b32_bf16_none_xla 150 --variant=B/32 --dtype=bfloat16 --remat=none --attention=xla \
  "${COMMON[@]}"
bench b16_bf16_none_xla 150 --variant=B/16 --dtype=bfloat16 --remat=none --attention=xla \
  "${COMMON[@]}"
bench b32_bf16_block 150 --variant=B/32 --dtype=bfloat16 --remat=block "${COMMON[@]}"
bench b16_bf16_block 150 --variant=B/16 --dtype=bfloat16 --remat=block "${COMMON[@]}"
bench b32_fp32_none 150 --variant=B/32 --dtype=float32 --remat=none "${COMMON[@]}"
bench b32_fp32_block 150 --variant=B/32 --dtype=float32 --remat=block "${COMMON[@]}"
bench b16_fp32_block 150 --variant=B/16 --dtype=float32 --remat=block "${SLOW[@]}"
bench b16_fp32_none 150 --variant=B/16 --dtype=float32 --remat=none "${SLOW[@]}"

# The largest batch, as time allows: the search stops itself 40 s before its run's limit.
for remat in none block; do
  left=$((DEADLINE - $(date +%s) - 10))
  if ((left >= 90)); then
    limit=$((left < 200 ? left : 200))
    bench "b16_bf16_${remat}_maxbatch" "$limit" --variant=B/16 --dtype=bfloat16 \
      --remat=$remat --frames=16 --batch=48 --steps=3 --warmup=1 --find_max_batch \
      --max_batch_budget_s=$((limit - 40))
  else
    echo "== SKIP b16_bf16_${remat}_maxbatch: ${left}s of the budget left"
  fi
done

# The evaluation step, if a minute is left.
if (($(date +%s) + 60 <= DEADLINE)); then
  bench b16_bf16_eval 60 --variant=B/16 --dtype=bfloat16 --mode=eval --frames=16 --batch=48 \
    --steps=10 --warmup=2
fi

collect
echo "== done in $(($(date +%s) - START))s; records in $OUT/results.json"
cat "$OUT/summary.md"
