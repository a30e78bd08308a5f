#!/usr/bin/env bash
# The whisper-tiny.en column of the calibration ablation (docs/results/calibration-ablation/whisper.json):
# each DyT / none start converted with the CLI on 16 train-clean utterances, then WER on the 14
# test-clean + dev-clean utterances, as a user runs them. Run from an empty work folder:
#   mkdir /tmp/wab && cd /tmp/wab && bash /path/to/normswap/scripts/ablate_whisper.sh
# Writes <row>.convert.json / <row>.eval.json and times.txt (convert seconds and load per row).
set -u
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
A=${NORMSWAP_ASSETS:-../shared/assets}; TRAIN="train-clean-100 (mini train-clean-5)"
row() { name=$1; shift; s=$(date +%s.%N); normswap convert $A/whisper-tiny.en --calib-audio $A/librispeech-subset --calib-audio-subsets "$TRAIN" --out $name --overwrite --threads 1 --format json "$@" > $name.convert.json 2> $name.convert.log; e=$(date +%s.%N); echo "$name convert_s $(echo "$e - $s" | bc) load $(cut -d' ' -f1-3 /proc/loadavg)" >> times.txt
  normswap eval $name --asr $A/librispeech-subset --asr-subsets test-clean,dev-clean --threads 1 --format json > $name.eval.json 2> $name.eval.log; echo "$name eval rc=$?" >> times.txt; }
normswap eval $A/whisper-tiny.en --asr $A/librispeech-subset --asr-subsets test-clean,dev-clean --threads 1 --format json > orig.eval.json 2> orig.eval.log
row dyt-alpha05 --to dyt --alpha-init 0.5
row dyt-parallel --to dyt --parallel
row dyt-seq --to dyt
row none-seq --to none
row none-parallel --to none --parallel
echo done >> times.txt
