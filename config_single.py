"""Defaults of main_single.py (ANA single-label). Edit the paths for your data; CLI flags override.

Same method as config.py, restricted to images with exactly one label (rows of the CSV with
more labels are dropped, and the count is logged). The defaults point at the single-label
demo data that ``python make_demo_data.py`` writes.
"""

# Data: same CSV format as config.py (path, TARGET, Split); rows with != 1 label are dropped.
DIR_TRAIN_IMAGES = "./data/ana_single/images/"
DIR_TEST_IMAGES = "./data/ana_single/images/"
PATH_TRAIN_ANNFILE = "./data/ana_single/annotations.csv"   # train and val rows
PATH_TEST_ANNFILE = "./data/ana_single/annotations.csv"    # test rows
NUM_CATEGORIES = 8      # None = infer from the CSV
BAG_COLUMN = None       # set to a column name for a pre-tiled CSV (one row per tile)
SINGLE_LABEL = True

# Tiling and input size (as config.py).
TILE_SIZE = 448
N = 224
MEAN = (0.005, 0.190, 0.006)
STD = (0.008, 0.102, 0.008)

# Model and optimisation (the reference code's README's defaults; its single-label command adds --lr 1e-3).
ARCH = "resnet50"
LR = 5e-3
WEIGHT_LR = None        # the reference main_single.py put its weights in the network's Adam at --lr
SGD_WEIGHT_LR = 0.03    # --weight_lr when --weightOptimizer sgd is given without one (benchmarks/README.md)
EPOCHS = 200
TRAIN_BATCH_SIZE = 32
TEST_BATCH_SIZE = 32     # the reference used BATCH_SIZE for both
WEIGHT_DECAY = 0.0
PATIENCE = 4

# Method defaults: what the reference main_single.py hard-wired, each overridable by its flag.
INIT_WEIGHT = "iw-ones"     # weight 1 on the positive label (every init gives this for one label)
UPDATE_LR = "ulr-ones"      # one group, one learning rate: nothing to adapt
TRAINING_LABEL = "pseudo"   # the reference always ran the pseudo-label path
GRANULARITY = "label"
WEIGHT_GROUPS = "one"       # one weight tensor [N, C], one Adam parameter group, never reset
SAMPLING = True             # the reference always drew tiles by their weights
RESAMPLE_EVERY = 2          # ... with probabilities recomputed on odd epochs (1, 3, 5, ...)
VAL_LEVEL = "image"         # model selection and early stopping on val images (max over tiles)

# Where things go.
PATH_MODEL_ROOT = "./checkpoints"
RUN_PREFIX = "ana_single"
CACHE_DIR = "./cache/tiles"
