#!/bin/bash
# Data for the bundled models/fanogan-phantom model (written into the current folder, not the repo).
# Patch positions depend on the store's random salt, so a rerun draws different, equally distributed patches.
set -euo pipefail
OCT=${OCTPIPE:-octpipe}   # e.g. OCTPIPE=.venv/bin/octpipe
$OCT phantom -o train-src --n 24 --seed 1000 --healthy-fraction 1.0 --lesions none --formats vol --overwrite
$OCT phantom -o test-src --n 8 --seed 2000 --healthy-fraction 0.5 --formats vol --overwrite
$OCT ingest train-src -o train.zarr --workers 1 --label healthy
$OCT ingest test-src -o test.zarr --workers 1
$OCT patches train.zarr --split train --k 64 --seed 0 --workers 0
$OCT patches test.zarr --split test --stride 32 --workers 0
