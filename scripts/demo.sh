#!/usr/bin/env bash
# Quick start 1: set up, generate the demo data, and train both families on it: the full
# self-paced ANA model (main.py, multi-label), its single-label variant (main_single.py), and
# the CryoEM PU + Selective FixMatch picker (train_pu_selective_fixmatch.py, 10 epochs), and the
# micrograph path: preprocess_cryoem.py -> training -> pick_particles.py -> evaluate_picks.py.
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
# CryoEM from whole micrographs: preprocess -> train -> pick -> evaluate (mic_03 held out for test)
M=data/micrographs
.venv/bin/python preprocess_cryoem.py --micrographs $M/micrographs --coordinates $M/coordinates.star \
  --particle-radius 10 --patch-size 32 --context 64 --stride 32 \
  --test-micrographs mic_03 --output-dir data/micrographs_pu --overwrite
rm -rf experiments/demo_micrographs
.venv/bin/python train_pu_selective_fixmatch.py --config configs/micrographs_demo.yaml --exp-name demo_micrographs
# picks at the threshold training stored (--threshold auto); candidates.star keeps the whole ranking
.venv/bin/python pick_particles.py --checkpoint experiments/demo_micrographs/best_model.pt \
  --micrographs $M/micrographs/mic_03.mrc --output-dir experiments/demo_micrographs/picks --stride 8 --overlay
# F1 at the picking threshold (read from picks/picking.json) beside the best F1 of any threshold
.venv/bin/python evaluate_picks.py --picks experiments/demo_micrographs/picks/candidates.star \
  --reference $M/coordinates.star --radius 10
echo "demo done: ANA in checkpoints/demo_ana{,_single}/ (output.txt, results.json), CryoEM in experiments/demo_cryoem/"
echo "(train.log, results.json) and experiments/demo_micrographs/ (picks/: picks.star, evaluation.json, overlays/)"
echo "TensorBoard: tensorboard --logdir checkpoints, tensorboard --logdir experiments"
