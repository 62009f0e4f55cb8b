#!/bin/bash
# kdtrain on a real full file system (a 600 KB tmpfs; needs root for the mount), three cases:
#   1. the teacher store is too small for the teacher (~640 KB): warning, the run finishes (exit 0)
#   2. the teacher cache dir is full: warning, the run finishes (exit 0)
#   3. the run dir fills up (40 KB free): one line naming checkpoints/last.pt, exit 2, no temp file left
# Usage: sudo PYTHONPATH=. scripts/full_disk_check.sh   (from the repository root)
set -u
work=$(mktemp -d)
full="$work/full"
mkdir "$full"
mount -t tmpfs -o size=600k tmpfs "$full" || exit 1
trap 'umount "$full"; rm -rf "$work"' EXIT
common=(epochs=1 teacher_train.epochs=1 progress=off baseline=false)

python -m kdtrain "${common[@]}" teacher_store="$full/store" hydra.run.dir="$work/run1" >"$work/1.out" 2>&1
echo "1. store full: exit $?; $(grep -o 'teacher: not stored ([^;]*' "$work/1.out")"
rm -rf "${full:?}"/* "$full"/.??*

dd if=/dev/zero of="$full/filler" bs=1k count=600 status=none
python -m kdtrain "${common[@]}" teacher_store="$work/store" teacher_cache=disk teacher_cache_dir="$full/cache" \
  hydra.run.dir="$work/run2" >"$work/2.out" 2>&1
echo "2. cache dir full: exit $?; $(grep -o 'teacher cache: not written ([^;]*' "$work/2.out")"
rm -rf "${full:?}"/* "$full"/.??*

dd if=/dev/zero of="$full/filler" bs=1k count=560 status=none
python -m kdtrain "${common[@]}" epochs=2 teacher_store="$work/store" hydra.run.dir="$full/run" >"$work/3.out" 2>"$work/3.err"
echo "3. run dir full: exit $?; stderr: $(cat "$work/3.err")"
echo "   files left in checkpoints/: $(ls -A "$full/run/checkpoints" 2>/dev/null | wc -l)"
