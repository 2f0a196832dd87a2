#!/usr/bin/env bash
# Full GLUE sweep with MPNet's recipe (configs/glue/TASK.yaml), per backend and seed, on a GPU.
#
#   scripts/glue_sweep.sh CHECKPOINT GLUE_DIR OUTPUT [BACKENDS] [SEEDS]
#   scripts/glue_sweep.sh runs/base/checkpoint-final glue_data runs/glue "dense flex flex:128" "1 2 3"
#
# As in the MPNet paper, RTE, MRPC and STS-B start from the MNLI fine-tuned model of the same backend and
# seed; the other tasks start from CHECKPOINT. Each run writes OUTPUT/BACKEND/seedS/TASK/results.json
# (and best/); a finished run is skipped when the script is started again. At the end OUTPUT/glue.md
# holds one row per backend: every task's dev score (mean over seeds, x100) and the GLUE average.
# GLUE_DIR is the folder download_glue_data.py writes (CoLA/, SST-2/, MRPC/, QQP/, STS-B/, MNLI/, ...).
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
CKPT="$1"; GLUE="$2"; OUT="$3"
BACKENDS="${4:-dense flex}"
SEEDS="${5:-1}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
FIRST_TASKS="mnli qnli qqp sst2 cola"   # from CHECKPOINT
FROM_MNLI="rte mrpc stsb"               # from the MNLI model, as in the paper

run() {  # backend seed task init
    local backend="$1" seed="$2" task="$3" init="$4"
    local dir="$OUT/${backend/:/-w}/seed$seed/$task"
    if [[ -f "$dir/results.json" ]] && grep -q '"finished"' "$dir/results.json"; then
        echo "skip $dir (done)"
        return
    fi
    local flags=()
    if [[ "$backend" == flex* ]]; then flags+=(--use-flex-attention); fi
    if [[ "$backend" == *:* ]]; then flags+=(--sliding-window-size "${backend#*:}"); fi
    finetune-mpnet --checkpoint "$init" --task "$task" --data-dir "$GLUE" --config "$REPO/configs/glue/$task.yaml" \
        --seed "$seed" --output-dir "$dir" --no-progress "${flags[@]}"
}

for backend in $BACKENDS; do
    for seed in $SEEDS; do
        for task in $FIRST_TASKS; do run "$backend" "$seed" "$task" "$CKPT"; done
        mnli_best="$OUT/${backend/:/-w}/seed$seed/mnli/best"
        for task in $FROM_MNLI; do run "$backend" "$seed" "$task" "$mnli_best"; done
    done
done

python3 - "$OUT" <<'EOF'
import json, sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])
order = ["mnli", "qnli", "qqp", "rte", "sst2", "mrpc", "cola", "stsb"]
scores = defaultdict(lambda: defaultdict(list))
for path in sorted(out.glob("*/seed*/*/results.json")):
    result = json.loads(path.read_text())
    if result.get("best"):
        scores[result["backend"]][result["task"]].append(100 * result["best"]["score"])
lines = ["| backend | " + " | ".join(order) + " | avg |", "|---" * (len(order) + 2) + "|"]
for backend, tasks in scores.items():
    means = [sum(tasks[t]) / len(tasks[t]) if tasks.get(t) else None for t in order]
    done = [m for m in means if m is not None]
    cells = ["—" if m is None else f"{m:.2f}" for m in means]
    avg = f"{sum(done) / len(done):.2f}" if len(done) == len(order) else "—"
    lines.append(f"| {backend} | " + " | ".join(cells) + f" | {avg} |")
text = "\n".join(["# GLUE dev (x100, mean over seeds; MNLI = matched; MRPC/QQP mean of acc and F1; "
                  "STS-B mean of Pearson and Spearman)", "", *lines, ""])
(out / "glue.md").write_text(text)
print(text)
EOF
