#!/usr/bin/env bash
# Device smoke (no CI): every command on the embedded model with its weights on the GPU through its
# own --device-map (the first run, before the commands had it, forced the map in through a
# sitecustomize), then the audit with the defense and scan stages. Each step's exit status, seconds
# and stderr tail go to $OUT/smoke.log and $OUT/steps.jsonl; the runs' JSON outputs to $OUT/runs.tgz.
#   benchmarks/gpu/smoke.sh [DEVICE_MAP] [BIG_ROUTE_SECONDS]     (needs $OUT; .whl carried)
set -u
MAP=${1:-cuda}; BIG=${2:-0}
OUT=${OUT:-/tmp/smoke-out}; R=/tmp/smoke-runs; rm -rf "$R"; mkdir -p "$OUT" "$R"
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
{ nvidia-smi -L 2>&1; $PY -c "import torch,transformers;print('torch',torch.__version__,'cuda',torch.cuda.is_available(),'transformers',transformers.__version__)"; } | tee "$OUT/smoke.log"
step() {   # step NAME SECONDS PLACE(1: --device-map $MAP appended) ARGS...
  local name=$1 secs=$2 place=$3; shift 3
  local t0=$(date +%s%N) rc
  if [ "$place" = 1 ]; then set -- "$@" --device-map "$MAP"; fi
  timeout "$secs" $PY -m moeguard.cli "$@" >"$R/$name.out" 2>"$R/$name.err"; rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 )); local dt=$((ms / 1000)).$(( (ms % 1000) / 100 ))
  printf '== %s rc=%s %ss\n' "$name" "$rc" "$dt" | tee -a "$OUT/smoke.log"
  [ "$rc" = 0 ] || tail -n 25 "$R/$name.err" | tee -a "$OUT/smoke.log"
  printf '{"step": "%s", "rc": %s, "seconds": %s}\n' "$name" "$rc" "$dt" >> "$OUT/steps.jsonl"
}
T=arith-compare
# the CUDA-only tests (skipped elsewhere): hijack search/measure, observe, profile + serve on the GPU
t0=$(date +%s); timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$R/pytest-cuda.out" 2>&1; rc=$?
echo "== pytest-cuda rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/smoke.log"; tail -n 15 "$R/pytest-cuda.out" | tee -a "$OUT/smoke.log"
printf '{"step": "pytest-cuda", "rc": %s, "seconds": %s}\n' "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.jsonl"
step eval 60 1 eval --limit 64 --out "$R/eval.json"
for m in frequency gate reap reap-raw contrastive gradient ablation ablation-screened reconstruction; do
  step "attr-$m" 60 1 attribute --task $T --method $m --samples 16 --out "$R/attr-$m.json"
done
step prune 60 0 prune --scores "$R/attr-reap.json" --keep 2 --out "$R/pruned"
step merge 60 1 merge --scores "$R/attr-reap.json" --keep 2 --method router-weighted --samples 16 --in-memory --out "$R/merged"
step realign 120 1 realign --model "$R/pruned" --task $T --strategy orphan --budget 16 --query-size 8 --pool-size 64 --eval-limit 32 --out "$R/realign"
step route-attack 60 1 route-attack --layer 0 --expert 2 --steps 10 --candidates 64 --out "$R/ra"
step profile 90 1 monitor profile --limit 32 --window 4 --out "$R/profile.json"
$PY - "$R/log.jsonl" <<'PYEOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(48):
        c = ["ann", "bob", "eve"][i % 3]
        p = "Is 7 greater than 3? Answer:" if c != "eve" else "zq xv " * (i % 7 + 3)
        f.write(json.dumps({"id": f"{c}-{i}", "client": c, "time": i, "prompt": p}) + "\n")
PYEOF
step score 90 1 monitor score --profile "$R/profile.json" --log "$R/log.jsonl" --window 4 --out "$R/score"
step scan 120 1 scan --samples 8 --contexts 2 --out "$R/scan"
step harden 120 1 harden --steps 5 --out "$R/hardened"
step trace 120 0 trace --suspect "$R/pruned" --out "$R/trace"
step audit 240 0 audit --device-map "$MAP" --tasks $T --methods reap,gradient --keeps 2,4 --budgets 8,32 \
  --recovery-seeds 1 --pool-size 64 --recovery-eval-limit 32 --defense entangle --harden-steps 5 --scan --out "$R/audit"
if [ "$BIG" -gt 0 ]; then   # issue 16: does a far larger search hijack more experts with 20 tokens?
  step route-attack-big "$BIG" 1 route-attack --layer all --all --steps 300 --candidates 512 --out "$R/ra-big"
fi
tar czf "$OUT/runs.tgz" -C "$R" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' . 2>/dev/null
ls -la "$OUT"
