#!/usr/bin/env bash
# Quick start 1: set up, generate the demo data, and train the full self-paced model on it
# (main.py, multi-label) and the single-label variant (main_single.py).
# CPU-sized settings (ResNet-18, 96 px tiles, 12 epochs, random init since this machine may be
# offline); a GPU run would drop --arch/--imageSize/--epoch and use the config.py defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
.venv/bin/python make_demo_data.py
rm -rf checkpoints/demo_ana   # the demo's own run directory: start it afresh each time
.venv/bin/python main.py --saveModel --lr 1e-3 --weight_lr 1e-3 --initWeight iw-sample --updateLR ulr-adaptive \
  --granularity label --sampling --trainingLabel pseudo \
  --arch resnet18 --imageSize 96 --epoch 12 --no-pretrained --pathModelParams checkpoints/demo_ana "$@"
rm -rf checkpoints/demo_ana_single
.venv/bin/python main_single.py --saveModel --lr 1e-3 \
  --arch resnet18 --imageSize 96 --epoch 8 --no-pretrained --pathModelParams checkpoints/demo_ana_single "$@"
echo "demo done: see checkpoints/demo_ana{,_single}/output.txt and results.json (tensorboard --logdir checkpoints)"
