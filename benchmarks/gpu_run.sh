#!/usr/bin/env bash
# The GPU measurements of issues 10, 12 and 13, run ON a GPU machine from the project's root (no
# install: PYTHONPATH is the checkout; the main CUDA extension is not built, so `auto` means
# Triton for every method alike):
#   SPARSELLM_COMMIT=<commit> STEPS="tests sweep" BUDGET=420 bash benchmarks/gpu_run.sh
# needs .device-data/ (../shared/device/prepare.sh) for the tokenizer and the calibration text;
# SPARSELLM_COMMIT names the commit in the results (the machine's copy has no git history).
# Steps (each capped so the whole ends by BUDGET seconds; logs and JSON land in $OUT):
#   tests     the tests of the sparse decode kernels and the CUDA-graph decoder (TESTS_K and TESTS_M
#             narrow them: pytest -k and -m expressions)
#   smoke     the gpu-marked tests of the host-memory paths and Elsa's resume (30 s on an H200): a pruned
#             layer's weights go home into their own host tensors (tests/test_placement.py);
#             SparseLLM's token buffers in pinned host memory give the on-GPU results (the path
#             taken when they do not fit); SparseLLM's float16 products on CUDA equal their CPU
#             emulation; Elsa and masked-adam resumed on the GPU keep their states there
#             (tests/test_elsa.py). Run it before a long call that needs them
#   steptests the SparseLLM element-wise kernels' tests, compiled
#   sweep     benchmarks/sparse_gpu_sweep.py: every config of the sparse kernels vs dense at 7B
#             shapes (SWEEP_ARGS, e.g. "--tokens 1,4,16") -> sweep.json, sweep.md, and the kernels'
#             config table picked from it (also from a sweep cut by its cap) -> sparse_configs.json
#   bench     benchmarks/bench_export.py -m gpu (linears at 7B shapes, 32-layer 7B-shaped model
#             prefill / decode / CUDA-graph decode / compiled CUDA-graph decode; E2E_K narrows
#             them, e.g. E2E_K="decode-graph or decode-compiled"; BENCH_PARTS="llama7b" runs only
#             the model) -> bench_*.json, sparse_gpu_table.md; with the table the sweep step of
#             this call picked, if any (USE_PICK=0: the checkout's own table), so one call can
#             sweep and measure the picked configs end to end
#   prune     benchmarks/prune_7b.py: SparseGPT vs SparseLLM on 3 random 7B-shaped layers (RUNS
#             adds others, e.g. sparsellm:0.7:auto:chunk-tokens=762, the chunk before 2026-11-27)
#   profile   the same on 2 layers under torch.profiler (benchmarks/profile_prune.py): device time
#             by named part of the prune and by kernel -> logs/profile/*.md
#   memory    SparseLLM on 2 layers at 128 x 2048 calibration tokens (issue 12's memory target:
#             where its token buffers live, peak memory) -> prune_7b_128.json
#   cusparselt benchmarks/cusparselt_prefill.py (our cuSPARSELt binding vs dense vs torch 2:4; runs
#             before bench): its prefill crossovers merged into sparse_configs.json, which bench
#             then runs with; and tests/test_cusparselt.py
#   elsa7b    benchmarks/elsa_7b.py: Elsa's step time, tokens/s and memory on 4 random 7B-shaped
#             layers, plain (TF32 and bfloat16 autocast) and FSDP2 over one process (issue 10)
#   elsasmall benchmarks/elsa_7b.py on a random model of the default model's shape (30 layers, 8 x 512
#             tokens a step, as the full recipe): Elsa's step eager and with --compile -> elsa_small.json
#   sg90      SparseGPT at 90% on the default model with --backend reference and auto (needs the model
#             carried as for elsafull) -> sg90_*.json
#   quality   benchmarks/quality.py --full on the default model (issue 12's table: every method at
#             every setting over all layers, SparseGPT and SparseLLM over the first half; the wiki
#             splits as .txt files; QUALITY_ARGS replaces --full) -> quality_gpu.json, quality_gpu.md;
#             needs the model carried as for elsafull, so it is not among the default steps either
#   elsafull  benchmarks/elsa_quality.py on the default model at the public recipe's length
#             (ELSA_STEPS, default 4096 steps of 8 windows of 512 tokens: the public recipe's
#             batch 2 x accumulation 4 at the protocol's window, taken as one micro-batch of 8, the
#             same mean loss in a quarter of the launches; ELSA_BATCH / ELSA_ACCUM split it again;
#             lr 2e-4, lambda 0.01, interval 32; ELSA_SETTINGS, default 0.9; ELSA_METHODS, default
#             elsa,masked-adam, Elsa first; ELSA_PRECISION, default tf32; ELSA_COMPILE=1 trains the
#             torch.compile'd model) -> elsa_gpu.json (each
#             method's row is written when it ends; Elsa checkpoints every ELSA_CKPT_EVERY steps, default
#             512, in /tmp/elsa-keep with the JSON, so a run cut by its cap resumes when the same
#             command runs again on the same warm machine); needs the model carried in two calls
#             (benchmarks/device_model.sh), so it is not among the default steps
set -u
# It takes no arguments (its settings are the variables above): --help prints this header, and
# anything else, or a machine without a GPU, stops it before any step writes anything; under
# TRITON_INTERPRET=1 it runs on a CPU, as a dry run of a call's plumbing (steps given --device cpu).
if [ $# -gt 0 ]; then
  case "$1" in
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "gpu_run.sh takes no arguments (got: $*); settings are variables, see --help" >&2; exit 2 ;;
  esac
fi
if [ "${TRITON_INTERPRET:-0}" != 1 ] && ! command -v nvidia-smi > /dev/null 2>&1; then
  echo "gpu_run.sh runs on a GPU machine: nvidia-smi is not here (see --help)" >&2; exit 2
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SPARSELLM_JIT=0
R=$PWD; D=$R/.device-data; O=${OUT:-/tmp/out}; L=$O/logs; mkdir -p "$L"
END=$(( $(date +%s) + ${BUDGET:-420} ))
cap(){ local c=$1 r=$(( END - $(date +%s) - 10 )); [ $r -lt $c ] && c=$r; [ $c -lt 5 ] && c=5; echo $c; }
log(){ echo "== $(date +%T) $*" | tee -a "$O/steps.txt"; }
has(){ case " ${STEPS:-tests steptests sweep bench prune profile memory cusparselt elsa7b} " in *" $1 "*) return 0;; esac; return 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader >> "$O/steps.txt"
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)" >> "$O/steps.txt" 2>&1
P="python3 -m pytest -p no:cacheprovider"
bash benchmarks/device_model.sh keep >> "$O/steps.txt"  # a carried first half of the model, for the next call
# with_model LOG CAP CMD...: run CMD with the default model carried in two halves
# (benchmarks/device_model.sh), capped, output to LOG; its status is the step's
with_model(){ local log=$1 c=$2; shift 2
  ( . benchmarks/device_model.sh unpack > "$log" 2>&1 && timeout $(cap $c) "$@" >> "$log" 2>&1 ); }
if has tests; then
  t0=$(date +%s)
  # the whole files: on a GPU their non-gpu tests also run the compiled kernels (small shapes)
  timeout $(cap ${T_TESTS:-200}) $P -q -rs --timeout 140 tests/test_sparse_gpu.py tests/test_decode.py \
    ${TESTS_K:+-k "$TESTS_K"} ${TESTS_M:+-m "$TESTS_M"} > "$L/gpu_tests.log" 2>&1
  log "sparse/decode tests rc=$? $(( $(date +%s)-t0 )) s: $(tail -n 1 $L/gpu_tests.log)"
fi
if has smoke; then
  t0=$(date +%s)
  timeout $(cap ${T_SMOKE:-110}) $P -q -rs --timeout 60 tests/test_placement.py \
    tests/test_sparsellm.py::test_auxiliaries_in_host_memory_give_the_device_results \
    tests/test_sparsellm.py::test_float16_products_on_cuda_are_the_emulated_ones \
    tests/test_elsa.py::test_on_cuda_a_resumed_run_keeps_its_states_on_the_gpu > "$L/smoke_tests.log" 2>&1
  log "smoke tests rc=$? $(( $(date +%s)-t0 )) s: $(tail -n 1 $L/smoke_tests.log)"
fi
if has steptests; then
  t0=$(date +%s)
  timeout $(cap 60) $P -q --timeout 50 tests/test_kernels_triton.py -k "step" > "$L/step_tests.log" 2>&1
  log "sparsellm step kernel tests rc=$? $(( $(date +%s)-t0 )) s: $(tail -n 1 $L/step_tests.log)"
fi
if has sweep; then
  t0=$(date +%s)
  timeout $(cap ${T_SWEEP:-300}) python3 benchmarks/sparse_gpu_sweep.py ${SWEEP_ARGS:-} \
    --out "$O/sweep.json" --table "$O/sweep.md" > "$L/sweep.log" 2>&1
  log "sparse kernel config sweep rc=$? $(( $(date +%s)-t0 )) s"
  if [ -s "$O/sweep.json" ]; then
    timeout 60 python3 benchmarks/sparse_gpu_sweep.py --from "$O/sweep.json" \
      --pick "$O/sparse_configs.json" >> "$L/sweep.log" 2>&1
    log "config table picked rc=$?: $(grep -c '' "$O/sparse_configs.json" 2>/dev/null || echo 0) lines"
  else
    log "config table not picked: the sweep wrote no results"
  fi
fi
if has cusparselt && [ -f benchmarks/cusparselt_prefill.py ]; then
  # its own JIT build (cuSPARSELt binding, ~40 s): the switch that keeps the main extension off
  # must not stop this one; the benchmark first, so its printed compile time is the real one
  t0=$(date +%s)
  # --pick: its prefill crossovers into the call's config table (the sweep's, or a new one)
  SPARSELLM_JIT=1 timeout $(cap ${T_CSLT:-120}) python3 benchmarks/cusparselt_prefill.py --out "$O/cusparselt.json" \
    --pick "$O/sparse_configs.json" > "$L/cusparselt.log" 2>&1
  log "cusparselt bench rc=$? $(( $(date +%s)-t0 )) s"
  t0=$(date +%s)
  SPARSELLM_JIT=1 timeout $(cap 60) $P -q -rs --timeout 50 tests/test_cusparselt.py > "$L/cusparselt_tests.log" 2>&1
  log "cusparselt tests rc=$? $(( $(date +%s)-t0 )) s: $(tail -n 1 $L/cusparselt_tests.log)"
fi
if [ -s "$O/sparse_configs.json" ] && [ "${USE_PICK:-1}" = 1 ]; then
  export SPARSELLM_SPARSE_GPU_CONFIGS=$O/sparse_configs.json  # the later steps run the picked configs
fi
# a table with cuSPARSELt prefill crossovers: the export loads that extension (JIT-built above),
# which the switch that keeps the main extension off would refuse
BENCH_JIT=$SPARSELLM_JIT
grep -qs '"path": "cusparselt"' "${SPARSELLM_SPARSE_GPU_CONFIGS:-kernels/sparse_configs.json}" && BENCH_JIT=1
if has bench; then
  # two runs, two JSON files: pytest-benchmark writes its JSON only when a run ends, so a run
  # cut by its cap must not take the other's numbers with it
  # LINEAR_K / E2E_K narrow each part (pytest -k expressions)
  # BENCH_PARTS picks the parts (default both)
  for part in ${BENCH_PARTS:-linear llama7b}; do
    t0=$(date +%s); k=$([ $part = linear ] && echo "${LINEAR_K:-}" || echo "${E2E_K:-}")
    SPARSELLM_JIT=$BENCH_JIT SPARSELLM_BENCH_LAYERS=${LAYERS:-32} timeout $(cap ${T_BENCH:-150}) $P -q -m gpu --timeout 140 benchmarks/bench_export.py \
      -k "$part${k:+ and ($k)}" --benchmark-max-time=0.1 --benchmark-json "$O/bench_$part.json" > "$L/bench_$part.log" 2>&1
    log "bench_export $part rc=$? $(( $(date +%s)-t0 )) s: $(tail -n 1 $L/bench_$part.log)"
    # a run that selected nothing leaves an empty JSON, which the table script cannot read
    [ -s "$O/bench_$part.json" ] || rm -f "$O/bench_$part.json"
  done
  python3 benchmarks/sparse_gpu_table.py $(ls "$O"/bench_*.json) --out "$O/sparse_gpu_table.md" >> "$L/bench_table.log" 2>&1
fi
if has prune; then
  t0=$(date +%s)
  timeout $(cap ${T_PRUNE:-200}) python3 benchmarks/prune_7b.py --tokenizer "$D/tok" --calib "$D/wiki_calib.txt" \
    --runs "${RUNS:-sparsegpt:0.7:auto,sparsellm:0.7:auto}" --layers 3 \
    --nsamples 64 --seqlen 2048 --timeout 180 --out "$O/prune_7b.json" > "$L/prune_7b.log" 2>&1
  log "prune_7b rc=$? $(( $(date +%s)-t0 )) s"
fi
if has profile; then
  t0=$(date +%s)
  timeout $(cap ${T_PROFILE:-200}) python3 benchmarks/prune_7b.py --tokenizer "$D/tok" --calib "$D/wiki_calib.txt" \
    --runs "${PROFILE_RUNS:-sparsegpt:0.7:auto,sparsellm:0.7:auto}" --layers 2 --nsamples 64 --seqlen 2048 \
    --timeout 180 --profile "$L/profile" --out "$L/profile/prune_7b_profiled.json" > "$L/profile.log" 2>&1
  log "profile rc=$? $(( $(date +%s)-t0 )) s"
fi
if has memory; then
  t0=$(date +%s)
  timeout $(cap ${T_MEMORY:-200}) python3 benchmarks/prune_7b.py --tokenizer "$D/tok" --calib "$D/wiki_calib.txt" \
    --runs sparsellm:0.7:auto --layers 2 --nsamples 128 --seqlen 2048 --timeout 190 --out "$O/prune_7b_128.json" \
    > "$L/memory.log" 2>&1
  log "prune_7b at 128 x 2048 rc=$? $(( $(date +%s)-t0 )) s"
fi
if has elsa7b; then
  t0=$(date +%s)
  timeout $(cap ${T_ELSA:-300}) python3 benchmarks/elsa_7b.py --tokenizer "$D/tok" --calib "$D/wiki_calib.txt" \
    --runs "${ELSA_RUNS:-plain:float32,plain:float32:1:bfloat16,fsdp:float32,fsdp:bfloat16}" --layers ${ELSA_LAYERS:-4} \
    --timeout 180 --out "$O/elsa_7b.json" > "$L/elsa_7b.log" 2>&1
  log "elsa_7b rc=$? $(( $(date +%s)-t0 )) s"
fi
if has elsasmall; then
  # the default model's shape (random weights): eager against --compile, the recipe's 8 x 512 tokens a step
  t0=$(date +%s)
  timeout $(cap ${T_ELSA_SMALL:-240}) python3 benchmarks/elsa_7b.py --tokenizer "$D/tok" --calib "$D/wiki_calib.txt" \
    --shape smollm2-135m --layers 30 --batch-size 8 --seqlen 512 --steps ${ELSA_SMALL_STEPS:-40} --admm-interval 32 \
    --runs "${ELSA_SMALL_RUNS:-plain:float32,plain:float32:1:tf32:compile}" --timeout 220 \
    --out "$O/elsa_small.json" > "$L/elsa_small.log" 2>&1
  log "elsa_small rc=$? $(( $(date +%s)-t0 )) s"
fi
if has sg90; then
  # SparseGPT at 90% on the default model, the reference backend against auto (Triton here): run 1
  # of Elsa's call saw 8942 on an H200 where this CPU gives 3769 (and 4486 with one thread)
  for b in reference auto; do
    t0=$(date +%s)
    if with_model "$L/sg90_$b.log" ${T_SG90:-150} python3 -m sparsellm.cli --method sparsegpt --sparsity 0.9 \
         --backend $b --nsamples 32 --seqlen 512 --calib "$D/wiki_calib.txt" --eval "$D/wiki_test.txt" \
         --eval-windows 40 --no-dense-eval --quiet --report "$O/sg90_$b.json"; then rc=0; else rc=$?; fi
    log "sparsegpt 0.9 --backend $b rc=$rc $(( $(date +%s)-t0 )) s: $(grep -h '^perplexity' $L/sg90_$b.log)"
  done
fi
if has quality; then
  t0=$(date +%s)
  if with_model "$L/quality.log" ${T_QUALITY:-540} python3 benchmarks/quality.py ${QUALITY_ARGS:---full} \
       --calib "$D/wiki_calib.txt" --eval "$D/wiki_test.txt" --json "$O/quality_gpu.json" --markdown "$O/quality_gpu.md"
  then rc=0; else rc=$?; fi
  log "quality table rc=$rc $(( $(date +%s)-t0 )) s: $(grep -c ': ppl ' $L/quality.log) cells"
fi
if has elsafull; then
  t0=$(date +%s)
  # the JSON and Elsa's checkpoints (every ELSA_CKPT_EVERY steps) live on in /tmp on this machine:
  # a run cut by its cap resumes in the next call with the same command
  K=/tmp/elsa-keep; mkdir -p $K
  if with_model "$L/elsa_full.log" ${T_ELSA_FULL:-540} python3 benchmarks/elsa_quality.py \
       --settings "${ELSA_SETTINGS:-0.9}" --steps ${ELSA_STEPS:-4096} --batch-size ${ELSA_BATCH:-8} \
       --grad-accum ${ELSA_ACCUM:-1} --lr 2e-4 --admm-lambda 0.01 --admm-interval 32 \
       --methods "${ELSA_METHODS:-elsa,masked-adam}" --train-precision "${ELSA_PRECISION:-tf32}" --tag gpu \
       --calib "$D/wiki_calib.txt" --eval "$D/wiki_test.txt" --cache /tmp/elsa-cache --json $K/elsa_gpu.json \
       --checkpoint-root $K/checkpoints --checkpoint-every ${ELSA_CKPT_EVERY:-512} ${ELSA_COMPILE:+--compile} \
       --progress; then rc=0; else rc=$?; fi
  cp $K/elsa_gpu.json "$O/" 2>/dev/null
  log "elsa full recipe rc=$rc $(( $(date +%s)-t0 )) s: $(tr '\r' '\n' < $L/elsa_full.log | grep -E '^[0-9.:]+ (sparsegpt|elsa|masked-adam): ppl|^device_model' | tr '\n' ' ')"
fi
log done
# the tables last: the reply carries the end of the output
for f in "$O/sweep.md" "$O/sparse_gpu_table.md" "$O/quality_gpu.md"; do [ -f "$f" ] && cat "$f"; done
tail -n 12 "$L/prune_7b.log" 2>/dev/null
tail -n 5 "$L/memory.log" 2>/dev/null
for f in "$L"/profile/*.md; do [ -f "$f" ] && head -n 16 "$f"; done
tail -n 20 "$L/cusparselt.log" 2>/dev/null
tail -n 8 "$L/elsa_7b.log" 2>/dev/null
grep -E "FAILED|ERROR|Error|assert" "$L"/*.log | head -30
# the logs as one file (the reply brings back 8 files at most)
(cd "$O" && tar czf logs.tgz logs && rm -rf logs)
cat "$O/steps.txt"
