"""Defaults of main.py (ANA multi-label). Edit the paths for your data; CLI flags override.

The defaults point at the demo data that ``python make_demo_data.py`` writes.
"""

# Data: the annotation CSV has columns path (relative to the image directory), TARGET
# (space-separated class indices, e.g. "0 3 5") and Split (train/val/test).
DIR_TRAIN_IMAGES = "./data/images/"
DIR_TEST_IMAGES = "./data/images/"
PATH_TRAIN_ANNFILE = "./data/annotations.csv"   # train and val rows are read from here
PATH_TEST_ANNFILE = "./data/annotations.csv"    # test rows are read from here
NUM_CATEGORIES = 8      # 0 Golgi, 1 homogeneous, 2 nucleolar, 3 dots, 4 centromere,
                        # 5 nuclear envelope, 6 AMA, 7 speckled; None = infer from the CSV
BAG_COLUMN = None       # set to a column name for a pre-tiled CSV (one row per tile)

# Tiling and input size: whole images are cut into TILE_SIZE squares, resized to N.
TILE_SIZE = 448
N = 224
# Normalisation of the reference code (RGB; the fluorescence is in the green channel).
MEAN = (0.005, 0.190, 0.006)
STD = (0.008, 0.102, 0.008)

# Model and optimisation (the reference code's README's defaults).
ARCH = "resnet50"
LR = 5e-3
WEIGHT_LR = 5e-3
SGD_WEIGHT_LR = 0.03     # --weight_lr when --weightOptimizer sgd is given without one (benchmarks/README.md)
EPOCHS = 200
TRAIN_BATCH_SIZE = 32
TEST_BATCH_SIZE = 32     # the reference used BATCH_SIZE for both
WEIGHT_DECAY = 0.0
PATIENCE = 4            # stop after this many epochs without any metric improving (0 = never)

# Method defaults (the reference code's README's; the recommended full model is
# --initWeight iw-sample --updateLR ulr-adaptive --granularity label --sampling --trainingLabel pseudo).
INIT_WEIGHT = "iw-ones"
UPDATE_LR = "ulr-ones"
TRAINING_LABEL = "real"
GRANULARITY = "label"
WEIGHT_GROUPS = "count" # tiles whose weights share one Adam parameter group: same number of labels
                        # (what the reference main.py did), "combination" (same label set) or "one"
SAMPLING = False
RESAMPLE_EVERY = 1      # epochs between recomputing the weighted sampler's probabilities
VAL_LEVEL = "tile"      # validation on tiles (the reference main.py) or "image" (max over tiles)
SINGLE_LABEL = False    # main_single.py's config sets True: keep only rows with exactly one label

# Where things go.
PATH_MODEL_ROOT = "./checkpoints"   # default run directory: PATH_MODEL_ROOT/<name from hyperparameters>
RUN_PREFIX = "ana"
CACHE_DIR = "./cache/tiles"         # decoded tiles, reused across runs
