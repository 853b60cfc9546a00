#!/bin/bash
# The evaluate stage before (a worktree of db9a508 at /tmp/ev_old) and after (this tree) on the same inputs: base, SFT
# (base + models/adapter) and the merged model, CPU profile (2 processes x 1 thread, 16 test conversations, 96 new
# tokens, 204 critical questions), params of the stage with align on (evaluate_3models.json: metrics/params/evaluate.json
# of commit c88f038). Run from the repository root after `dvc repro`.
#   git worktree add /tmp/ev_old db9a508
run() {  # $1 name, $2 the src folder whose expqa runs
  mkdir -p /tmp/evbench/$1
  local t0=$(date +%s.%N)
  PYTHONPATH=$2 .venv/bin/python $2/../stages/evaluate.py --params /tmp/evbench/evaluate_3models.json \
    --base models/base --sft models/adapter --tuned models/merged --test data/processed/test.jsonl \
    --train data/processed/train.jsonl --out /tmp/evbench/$1/eval.json --headline /tmp/evbench/$1/headline.json \
    --examples /tmp/evbench/$1/examples.jsonl --plot /tmp/evbench/$1/rouge.csv > /tmp/evbench/$1/log.txt 2>&1
  echo "$1 rc=$? wall $(python3 -c "import time; print(round(time.time()-$t0,1))") s" | tee -a /tmp/evbench/times.txt
}
run old /tmp/ev_old/src
run new "$PWD/src"
