#!/bin/bash
# worker.sh: run the lines of out/ps19/jobs.txt one after another (lines may be appended while it runs);
# a line "STOP" ends the worker. Each line is arguments to examples/part_segmentation.py plus "--out DIR".
# Before each run it waits while /work/notes/QUIET exists (the lead's timing windows).
cd /work/wt-study17
export L1FX_CACHE_DIR=/work/cache-study17 OMP_NUM_THREADS=1
i=1
while true; do
  line=$(sed -n "${i}p" out/ps19/jobs.txt)
  if [ -z "$line" ]; then sleep 10; continue; fi
  [ "$line" = "STOP" ] && break
  while [ -e /work/notes/QUIET ]; do sleep 20; done
  name=$(echo "$line" | sed 's/.*--out out\/ps19\///; s/ .*//')
  if [ -f out/ps19/$name/results.json ]; then echo "$(date -u +%T) skip $name (done)" >> out/ps19/logs/worker.log; i=$((i+1)); continue; fi
  echo "$(date -u +%T) start $name: $line" >> out/ps19/logs/worker.log
  /usr/bin/time -f "%e s wall %U s user %S s sys" nice -n 19 .venv/bin/python examples/part_segmentation.py \
      $line --threads 1 --no-progress --no-plots --speed-repeats 0 > out/ps19/logs/$name.log 2>&1
  echo "$(date -u +%T) end $name rc=$? $(tail -1 out/ps19/logs/$name.log)" >> out/ps19/logs/worker.log
  i=$((i+1))
done
