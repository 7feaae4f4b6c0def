"""What a CryoEM run reports: the data's counts, its train.log lines, its TensorBoard scalars and
results.json (train_pu_selective_fixmatch.py; README, CryoEM "Outputs").

TensorBoard: ``train/*`` and ``val/*`` scalars of the EMA teacher, plus ``val/student_auc``;
step = the 1-based epoch.
"""
import json
import math

from utils.errors import UserError

# Train metrics written to TensorBoard (train/<key>) each epoch.
TRAIN_SCALARS = ("loss", "objective", "loss_pos", "loss_neg", "consistency_loss", "entropy_loss", "mask_rate",
                 "pseudo_positive_rate", "consistency_weight", "entropy_weight", "lr", "nn_correction_rate",
                 "patches_per_s")
VAL_SCALARS = ("auc", "ap", "f1", "precision", "recall", "best_f1", "best_f1_threshold")


def fmt(value, spec=".4f"):
    """``value`` formatted, or "nan" for None and NaN."""
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def data_context(data):
    """``metadata.context`` of the data (px of surroundings around the classified window; 0 when absent)."""
    context = data.metadata.get("context", 0) if isinstance(data.metadata, dict) else 0
    if isinstance(context, bool) or not isinstance(context, int) or context < 0 or context % 32 \
            or data.patch_size - 2 * context < 32:
        raise UserError(f"{data.files[0] if data.files else 'the data'}: metadata.context is {context!r}, expected a "
                        f"multiple of 32 px leaving a window of at least 32 px in the {data.patch_size} px patches")
    return context


def data_counts(data, prior):
    """The ``data`` entry of results.json: sizes of the splits and what the metrics mean."""
    def labelled(ds):
        labels = getattr(ds, "labels", None)
        n = len(ds)
        return n, int(labels.sum().item()) if labels is not None and n else 0

    n_val, n_val_pos = labelled(data.val)
    n_test, n_test_pos = labelled(data.test)
    return {"n_train_positive": int(data.n_pos), "n_train_unlabeled": int(data.n_unl),
            "n_val": n_val, "n_val_positive": n_val_pos, "n_test": n_test, "n_test_positive": n_test_pos,
            "patch_size": int(data.patch_size), "n_files": len(data.files), "prior": prior,
            "heldout": bool(data.heldout)}


def _heldout_note(data):
    """"; val is a positive-vs-unlabelled hold-out" (and/or test), or "" when both are labelled sets."""
    names = [name for name in ("val", "test") if getattr(data, name) is not None and getattr(data, name).heldout]
    if not names:
        return ""
    return f"; {'/'.join(names)} {'are' if len(names) > 1 else 'is a'} positive-vs-unlabelled hold-out" \
        + ("s" if len(names) > 1 else "")


def data_line(data_dir, counts, data):
    """The log line of the data: patches per split."""
    return (f"data {data_dir}: {counts['n_train_positive']} positive + "
            f"{counts['n_train_unlabeled']} unlabelled training patches of {counts['patch_size']} px; "
            f"val {counts['n_val']} ({counts['n_val_positive']} positive), "
            f"test {counts['n_test']} ({counts['n_test_positive']} positive)"
            + _heldout_note(data))


def epoch_line(stats, val, student_auc, ema, epoch, epochs, improved):
    """The train.log line of an epoch: train means, the teacher's val metrics."""
    return (
        f"epoch {epoch}/{epochs} | loss {stats['loss']:.4f} (pos {stats['loss_pos']:.4f} neg "
        f"{stats['loss_neg']:.4f} nn {stats['nn_correction_rate']:.2f}) | cons {stats['consistency_loss']:.4f} "
        f"x{stats['consistency_weight']:.2f} | ent {stats['entropy_loss']:.4f} x{stats['entropy_weight']:.3g} | "
        f"mask {fmt(stats['mask_rate'], '.3f')} pseudo+ {fmt(stats['pseudo_positive_rate'], '.3f')} | "
        f"lr {stats['lr']:.2e} | {stats['patches_per_s']:.0f} patches/s {stats['seconds']:.1f}s | "
        + (f"val auc {fmt(val['auc'])} ap {fmt(val['ap'])} precision {fmt(val['precision'])} "
           f"recall {fmt(val['recall'])} f1 {fmt(val['f1'])} best_f1 {fmt(val['best_f1'])}"
           + (f" (student auc {fmt(student_auc)})" if ema else "")
           if val is not None else "no val set")
        + (" | new best" if improved else ""))


def write_scalars(writer, stats, val, student_auc, epoch):
    """The epoch's TensorBoard scalars (NaN ones are left out), flushed."""
    for key in TRAIN_SCALARS:
        if not math.isnan(stats[key]):
            writer.add_scalar(f"train/{key}", stats[key], epoch)
    for key in VAL_SCALARS if val is not None else ():
        if not math.isnan(val[key]):
            writer.add_scalar(f"val/{key}", val[key], epoch)
    if not math.isnan(student_auc):
        writer.add_scalar("val/student_auc", student_auc, epoch)
    writer.flush()


def picking_line(picking, best_path):
    return (f"picking threshold: {picking['rule']} rule"
            + (f" {picking['value']:.4f}" if "value" in picking else "") + f" ({picking['why']}), stored in "
            f"{best_path} for pick_particles.py --threshold auto")


def test_line(results):
    """The log line of the test metrics in ``results`` (results.json's dict)."""
    test, test_at_best = results["test"], results["test_at_val_best_f1_threshold"]
    return (f"test (best epoch {results['best_epoch']}, teacher) | auc {fmt(test['auc'])} ap {fmt(test['ap'])} "
            f"precision {fmt(test['precision'])} recall {fmt(test['recall'])} f1 {fmt(test['f1'])}"
            + (f" | at val's best-F1 threshold {test_at_best['threshold']:.3f}: f1 {fmt(test_at_best['f1'])}"
               if test_at_best is not None else ""))


def read_results(run_dir):
    """results.json's dict plus ``run_dir``; None when the file is missing or unreadable (then rewritten)."""
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return {**results, "run_dir": str(run_dir)} if isinstance(results, dict) else None
