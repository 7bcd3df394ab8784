#!/usr/bin/env bash
# Our DFER-CLIP training step and the PyTorch one, side by side on one GPU, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT
#   bash benchmarks/gpu_check.sh --smoke    # the same sequence at tiny sizes (CPU is fine)
#
# Runs, alternating ours (`python -m dfer_clip_jax.benchmarks.train_step`) and PyTorch's
# (`benchmarks/torch_step.py`: transformers' CLIP towers, the same temporal model, prompt
# learner, loss and SGD groups), each in its own process, most important first:
#   B/32 and B/16 at 16 frames, batch 48: ours bfloat16, torch bf16 (autocast + SDPA), torch
#   bf16 under torch.compile; then float32 (true fp32 on both sides: no TF32) for torch and ours;
#   then our speed switches one at a time against the default (XLA attention instead of the
#   padded cuDNN one, remat "dots", the XLA flag presets, micro-batches), and our fastest and
#   largest batch per device. Every run has its own time limit and the whole script a budget
#   (BUDGET_S seconds, default 450): what does not fit is skipped and listed as skipped; a run
#   that fails, runs out of memory or out of time is recorded as such and the script goes on.
# The table at the end has one row per run and, per model size and precision, our clips/s over
# torch fp32's (the authors' set-up) and over torch bf16-compile's (the fastest torch).
#
# Installs nothing from the network. The GPU image's python3 brings jax (with CUDA), flax,
# optax, orbax, torch and transformers; the wheels in .whl/ (grain, array_record, portpicker,
# ml_collections: our package imports them) are installed into $SITE (default /tmp/site) when
# present. If the image's flax, optax or orbax cannot run our model, the pinned ones in
# .whl/fallback/ are tried. To make .whl/ (git-ignored through .git/info/exclude; ~7 MB):
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64"
#   pip download $P -d .whl grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker
#   pip download $P -d .whl/fallback flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
#
# Output ($OUT, default /tmp/gpu_check): results.json (every record, one list), summary.md
# (the tables), log.txt (everything printed). The tables are printed last.
# ONLY="name1 name2" runs just those runs of the sequence (the names printed as "== name").

set -u -o pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-/tmp/gpu_check}
BUDGET_S=${BUDGET_S:-450}
PY=${PYTHON:-python3}
RUNS=${RUNS:-/tmp/gpu_check_runs}  # one JSON per run; collected into $OUT after each run
WORK=${WORK:-/tmp/gpu_check_work}  # the demo tokenizer, built once
SITE=${SITE:-/tmp/site}            # where the carried wheels are installed
ONLY=${ONLY:-}
mkdir -p "$OUT" "$RUNS" "$WORK"
rm -f "$RUNS"/*.json
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))

export PYTHONUNBUFFERED=1
# The usual training setting: most of the GPU's memory for XLA's pool (JAX's default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# A persistent compilation cache also keeps XLA's per-fusion autotuning results, so later runs
# of the same shapes reuse the kernel choices of earlier ones.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
export TRANSFORMERS_VERBOSITY=error

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || echo "WARNING: installing .whl/*.whl failed"
  export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null \
  || echo "no nvidia-smi"
$PY - <<'EOF' || true
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections",
             "torch", "transformers"):
  try:
    print(f"{name} {importlib.import_module(name).__version__}")
  except Exception as err:  # pylint: disable=broad-except
    print(f"{name}: {type(err).__name__}: {err}")
EOF

collect() {
  $PY -m dfer_clip_jax.benchmarks.report "$RUNS" --json="$OUT/results.json" \
    --md="$OUT/summary.md" > /dev/null 2>&1 || echo "WARNING: collecting the results failed"
}

# run NAME LIMIT_S COMMAND...: one benchmark run (a command taking --json=FILE) in its own
# process, at most LIMIT_S seconds and never past the deadline; writes $RUNS/NAME.json (a stub
# record if the run wrote none).
run() {
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [ "$name" != smoke ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$((DEADLINE - $(date +%s)))
  if ((left < 40)); then
    echo "== SKIP $name: ${left}s of the budget left"
    printf '{"status": "skipped (budget)", "run": "%s"}\n' "$name" > "$RUNS/$name.json"
    return 1
  fi
  limit=$((limit * LIMIT_SCALE))
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" --json="$RUNS/$name.json" > "$RUNS/$name.out" 2>&1
  local rc=$?
  # The run's log without its JSON record (printed indented) and without its one-row table.
  grep -v -e '^ ' -e '^[{}]' -e '^|' -e '^Device:' -e '^$' "$RUNS/$name.out" | tail -n 12
  echo "== $name: exit $rc after $(($(date +%s) - t0))s"
  $PY - "$RUNS/$name.json" "$name" "$rc" "$@" <<'EOF'
import json, pathlib, sys
path, name, rc, args = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
if path.is_file() and path.stat().st_size:
  r = json.loads(path.read_text())
else:  # killed before writing its record
  r = {"status": "timeout" if rc in (124, 137) else f"crash (exit {rc})", "args": args}
  for a in args:
    key, _, value = a.lstrip("-").partition("=")
    if value:
      r[key] = value
  r.setdefault("framework", "torch" if any("torch_step" in a for a in args) else "jax")
r["run"] = name
path.write_text(json.dumps(r, indent=2))
line = f"== result: {r.get('status')}"
for key, fmt in (("clips_per_s", "{:.1f} clips/s"), ("step_ms_pipelined", "{:.1f} ms/step"),
                 ("mfu", "MFU {:.1%}"), ("peak_memory_gb", "peak {:.1f} GB"),
                 ("compile_s", "compile {:.0f} s"), ("attention_used", "attention {}"),
                 ("text_share", "text tower {:.0%} of the step"),
                 ("max_batch_per_device", "max batch/device {}"),
                 ("fastest_batch_per_device", "fastest batch/device {}")):
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

LIMIT_SCALE=1
if ((SMOKE)); then
  LIMIT_SCALE=3  # a CPU compiles the tiny steps slower than a GPU compiles the real ones
  B32=tiny; B16=tiny
  SHAPE=(--frames=2 --batch=8)
  STEPS=(--steps=2 --warmup=1); SLOW=(--steps=2 --warmup=1)
  MAXB=(--max_batch_limit=16 --max_batch_budget_s=60)
else
  B32=B/32; B16=B/16
  SHAPE=(--frames=16 --batch=48)
  STEPS=(--steps=8 --warmup=2); SLOW=(--steps=4 --warmup=1)  # fp32 B/16: ~1 s per step
  MAXB=(--max_batch_budget_s=110)
fi
OURS=($PY -m dfer_clip_jax.benchmarks.train_step --workdir="$WORK" --mode=train "${SHAPE[@]}")
TORCH=($PY benchmarks/torch_step.py --workdir="$WORK" "${SHAPE[@]}")

echo "== smoke test (tiny model, XLA attention)"
SMOKE_ARGS=(--variant=tiny --frames=2 --batch=8 --dtype=bfloat16 --attention=xla --steps=2
            --warmup=1)
run smoke 120 $PY -m dfer_clip_jax.benchmarks.train_step --workdir="$WORK" "${SMOKE_ARGS[@]}"
if [ "$(status_of "$RUNS/smoke.json")" != ok ] && compgen -G ".whl/fallback/*.whl" > /dev/null
then
  echo "== smoke test failed with the image's packages: trying the pinned flax/optax/orbax"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE-fallback" .whl/fallback/*.whl && export PYTHONPATH=$SITE-fallback:$PYTHONPATH
  run smoke 120 $PY -m dfer_clip_jax.benchmarks.train_step --workdir="$WORK" "${SMOKE_ARGS[@]}"
fi
if [ "$(status_of "$RUNS/smoke.json")" != ok ]; then
  echo "== smoke test failed: see $RUNS/smoke.out above; stopping"
  collect
  cat "$OUT/summary.md" 2>/dev/null
  exit 1
fi
rm -f "$RUNS/smoke.json"  # not a row of the tables

# bfloat16, ours and torch's in turn (the limits are generous: a cold compile can be slow).
run b32_bf16 120 "${OURS[@]}" --variant=$B32 --dtype=bfloat16 "${STEPS[@]}"
run torch_b32_bf16 90 "${TORCH[@]}" --variant=$B32 --impl=bf16 "${STEPS[@]}"
run torch_b32_bf16_compile 150 "${TORCH[@]}" --variant=$B32 --impl=bf16-compile "${STEPS[@]}"
run b16_bf16 120 "${OURS[@]}" --variant=$B16 --dtype=bfloat16 "${STEPS[@]}"
run torch_b16_bf16 90 "${TORCH[@]}" --variant=$B16 --impl=bf16 "${STEPS[@]}"
run torch_b16_bf16_compile 150 "${TORCH[@]}" --variant=$B16 --impl=bf16-compile "${STEPS[@]}"
# float32 as the authors ran it.
run torch_b32_fp32 90 "${TORCH[@]}" --variant=$B32 --impl=fp32 "${STEPS[@]}"
run b32_fp32 150 "${OURS[@]}" --variant=$B32 --dtype=float32 "${STEPS[@]}"
run torch_b16_fp32 90 "${TORCH[@]}" --variant=$B16 --impl=fp32 "${SLOW[@]}"
run b16_fp32 150 "${OURS[@]}" --variant=$B16 --dtype=float32 "${SLOW[@]}"
# Our switches, one at a time against the default bfloat16 runs above.
run b16_bf16_attn_xla 100 "${OURS[@]}" --variant=$B16 --dtype=bfloat16 --attention=xla \
  "${STEPS[@]}"
run b32_bf16_cublas 100 "${OURS[@]}" --variant=$B32 --dtype=bfloat16 --xla_gpu_flags=cublas \
  "${STEPS[@]}"
run b16_bf16_remat_dots 100 "${OURS[@]}" --variant=$B16 --dtype=bfloat16 --remat=dots \
  "${STEPS[@]}"
run b32_bf16_nographs 100 "${OURS[@]}" --variant=$B32 --dtype=bfloat16 --xla_gpu_flags=nographs \
  "${STEPS[@]}"
# The fastest and the largest batch per device (each fitting trial is timed).
run b32_bf16_maxbatch 170 "${OURS[@]}" --variant=$B32 --dtype=bfloat16 --find_max_batch \
  "${MAXB[@]}" --steps=2 --warmup=1
run b32_bf16_micro2 100 "${OURS[@]}" --variant=$B32 --dtype=bfloat16 --microbatches=2 \
  "${STEPS[@]}"

collect
echo "== done in $(($(date +%s) - START))s; records in $OUT/results.json"
cat "$OUT/summary.md"
