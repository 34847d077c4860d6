#!/bin/bash
# worker.sh N: run the lines of out/ps18/jobs_N.txt one after another (lines may be appended while it runs);
# a line "STOP" ends the worker. Each line is arguments to examples/part_segmentation.py plus "--out DIR".
cd /work/wt-study17
export L1FX_CACHE_DIR=/work/wt-study17/.cache-kernels OMP_NUM_THREADS=1
i=1
while true; do
  line=$(sed -n "${i}p" out/ps18/jobs_$1.txt)
  if [ -z "$line" ]; then sleep 15; continue; fi
  [ "$line" = "STOP" ] && break
  name=$(echo "$line" | sed 's/.*--out out\/ps18\///; s/ .*//')
  echo "$(date -u +%T) start $name: $line" >> out/ps18/logs/worker_$1.log
  /usr/bin/time -f "%e s wall %U s user %S s sys" nice -n 19 .venv/bin/python examples/part_segmentation.py \
      $line --threads 1 --no-progress --no-plots --speed-repeats 0 > out/ps18/logs/$name.log 2>&1
  echo "$(date -u +%T) end $name rc=$? $(tail -1 out/ps18/logs/$name.log)" >> out/ps18/logs/worker_$1.log
  i=$((i+1))
done
