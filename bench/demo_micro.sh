#!/bin/bash
# The demo (`make demo`: recipes/paper-cifar10.yaml on all of CIFAR-10) with cold caches, timed
# whole: batches of 256 through the backbone as before micro-batches (--micro-batch 256), then
# the default chunks. BENCHMARKS.md, end to end (make demo). Run from the project root; about 22 minutes here.
set -euo pipefail
W=bench/.work/demo-micro; rm -rf $W; mkdir -p $W
for v in whole default; do
  extra=""; [ $v = whole ] && extra="--micro-batch 256"
  echo "$v start $(date +%T)"
  /usr/bin/time -f "$v wall %e s" .venv/bin/graft train --config recipes/paper-cifar10.yaml \
    --data ../shared/datasets/cifar10-jpeg.zip --cache-dir $W/cache-$v --out $W/runs --name demo-$v $extra \
    > $W/$v.out 2> $W/$v.err
  tail -1 $W/$v.err
  grep -a "features \|test accuracy" $W/runs/demo-$v/log.txt
done
