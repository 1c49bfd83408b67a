#!/usr/bin/env bash
# The README's quick start, run as a newcomer runs it, and what it printed stored with the commit.
#
# A fresh clone of this checkout's HEAD, a fresh venv, empty caches (the converted model and the
# compiled CPU sweep); the first ```bash block of the README's Quick start is run as written (read
# from the README itself, as .ci/run reads the second block), timed by the wall clock, and its
# summary lines are appended as one run to benchmarks/results/quickstart.json: the commit, the
# machine, the time in all and the prune's, the perplexities and the achieved sparsity. The
# README's quick-start numbers are those of the last run there.
#
# Usage: bash benchmarks/quickstart.sh [WORKDIR]   (default: a new folder under /tmp; its log is
# WORKDIR/quickstart.log). Takes about 10 minutes on 2 CPU cores. Exit status: the block's.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]]; then
    echo "the run measures HEAD: commit or stash the changes to tracked files first" >&2
    exit 1
fi
WORK="${1:-$(mktemp -d /tmp/sparsellm-quickstart.XXXXXX)}"
COMMIT="$(git -C "$REPO" rev-parse HEAD)"
rm -rf "$WORK/clone" "$WORK/cache" "$WORK/ext"
mkdir -p "$WORK"
git clone -q "$REPO" "$WORK/clone"
git -C "$WORK/clone" checkout -q "$COMMIT"

BLOCK="$(awk '/^## Quick start/{q=1} q && /^```bash/{n++; if (n==1) {b=1; next}} b && /^```/{exit} b' "$WORK/clone/README.md")"
case "$BLOCK" in
    *sparsellm-prune*) ;;
    *) echo "README.md's first quick-start block does not run sparsellm-prune: $BLOCK" >&2; exit 1 ;;
esac
echo "== $COMMIT in $WORK/clone; log: $WORK/quickstart.log"

export SPARSELLM_CACHE="$WORK/cache" SPARSELLM_EXT_CACHE="$WORK/ext"
start=$(date +%s)
set +e
(cd "$WORK/clone" && bash -euo pipefail -c "$BLOCK") > "$WORK/quickstart.log" 2>&1
status=$?
set -e
total=$(( $(date +%s) - start ))
echo "== exit status $status after $total s"
[[ $status -eq 0 ]] || { tail -20 "$WORK/quickstart.log" >&2; exit "$status"; }

CAPABILITY="$("$WORK/clone/.venv/bin/python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"
LOG="$WORK/quickstart.log" BLOCK="$BLOCK" COMMIT="$COMMIT" TOTAL="$total" CAPABILITY="$CAPABILITY" \
OUT="$REPO/benchmarks/results/quickstart.json" python3 - <<'EOF'
import datetime, json, os, platform, re

env = os.environ
text = open(env["LOG"], errors="replace").read()
summary = re.search(r"method (\S+)\s+pattern (\S+)\s+achieved sparsity ([\d.]+)\s+prune ([\d.]+)s", text)
perplexity = re.search(r"perplexity \[(\w+)\]\s+dense ([\d.]+)\s+pruned ([\d.]+)", text)
if not (summary and perplexity):
    raise SystemExit(f"no summary lines in {env['LOG']}")
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor())
run = {
    "commit": env["COMMIT"],
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": env["BLOCK"],
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_cpu_capability": env["CAPABILITY"]},
    "caches": "empty (model conversion and CPU sweep compilation included)",
    "total_seconds": int(env["TOTAL"]),
    "method": summary[1], "pattern": summary[2], "achieved_sparsity": float(summary[3]),
    "prune_seconds": float(summary[4]),
    "eval_data": perplexity[1], "dense_ppl": float(perplexity[2]), "pruned_ppl": float(perplexity[3]),
}
path = env["OUT"]
stored = json.load(open(path)) if os.path.exists(path) else {
    "about": "benchmarks/quickstart.sh: the README's quick start in a fresh clone, venv and caches", "runs": []}
stored["runs"].append(run)
# the file holds every earlier run: written beside it and renamed into place, never half-written
with open(path + ".tmp", "w") as f:
    json.dump(stored, f, indent=1)
    f.write("\n")
os.replace(path + ".tmp", path)
print(json.dumps(run, indent=1))
EOF
