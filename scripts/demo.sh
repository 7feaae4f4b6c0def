#!/usr/bin/env bash
# Quick start 1: set up, generate the demo data, and train both families on it: the full
# self-paced ANA model (main.py, multi-label), its single-label variant (main_single.py), and
# the CryoEM PU + Selective FixMatch picker (train_pu_selective_fixmatch.py, 10 epochs).
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
rm -rf experiments/demo_cryoem
.venv/bin/python train_pu_selective_fixmatch.py --config configs/pu_selective_fixmatch.yaml --exp-name demo_cryoem \
  --epochs 10
echo "demo done: ANA in checkpoints/demo_ana{,_single}/ (output.txt, results.json), CryoEM in experiments/demo_cryoem/"
echo "(train.log, results.json); TensorBoard: tensorboard --logdir checkpoints, tensorboard --logdir experiments"
