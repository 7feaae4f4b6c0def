"""The GPU paths of both families, checked and timed in one command (about 7 minutes on one H100/H200).

    python benchmarks/gpu_check.py                    # on a CUDA machine: writes runs/gpu_check/gpu_check.{json,md}
    python benchmarks/gpu_check.py --smoke            # the same code on the CPU, tiny sizes, in about a minute
    python benchmarks/gpu_check.py --parts dense_map speed_cryoem --budget-s 120   # some parts only

Every part runs in its own process (so a crash, a hang or a memory blow-up stays in its row)
with its own time budget, cut to what is left of ``--budget-s``; a part whose budget is gone is
skipped with a note, so the command always ends with the table. Everything runs the code users
run, on generated data:

Correctness on the device
* ``ana_resume``: ``main.py`` (full model, ``--deterministic``) for 2 epochs; the same run
  killed with SIGKILL once epoch 1's ``last.pt`` exists and resumed with ``--loadModel``; a
  1-process ``torchrun`` run (NCCL on a GPU). Compared: the network, the instance weights and
  the last test metrics of each against the uninterrupted run.
* ``cryoem_resume``: the same for ``train_pu_selective_fixmatch.py`` (``--resume``).
* ``weights``: :class:`models.sample_weights.InstanceWeights` on the device against the CPU for
  one stream of batches and gradients (regrouping included).
* ``amp_agreement``: ``benchmarks/amp_agreement.py`` for both families (float32 vs the
  trainers' mixed precision).
* ``dense_map``: the dense picking map (``models.dense.probability_map``) on the device against
  the CPU, with the default cuDNN settings (TF32 convolutions) and with TF32 off.

Speed (with peak GPU memory)
* ``speed_ana_*``: ``benchmarks/bench_ana.py`` at the paper's setting (ResNet-50, 224 px, batch
  32): float32, bf16, bf16 + channels-last, and + ``torch.compile``; the method against the
  plain BCE loop, and the share of an epoch spent waiting for data.
* ``speed_cryoem``: ``benchmarks/bench_cryoem.py`` (selective FixMatch vs a supervised step,
  dense vs crop picking of a 4096 x 4096 micrograph).
* ``picking``: :func:`utils.picking.picker.pick_micrograph` on a 4096 x 4096 micrograph at
  downsampling 1 and 2 (micrographs/s).

Without CUDA and without ``--smoke`` it stops with one line. ``--smoke`` runs every part on the
CPU at tiny sizes (``torch.compile`` skipped: minutes of compiling on a CPU); the test suite runs
it so the script cannot rot while no GPU is at hand.
"""
import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from utils.errors import UserError, exit_on_user_error  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (part, seconds on a GPU, seconds with --smoke), in the order they run: correctness first
# (measured on an H200 VM: a fresh process takes 5-10 s to import torch and start CUDA, and
# bench_ana spends ~30 s generating and caching its images before the first timed epoch)
PARTS = (("ana_resume", 110, 90), ("cryoem_resume", 110, 90), ("weights", 20, 30), ("dense_map", 30, 30),
         ("speed_ana_fp32", 60, 45), ("speed_ana_bf16_cl", 60, 45), ("speed_ana_compile", 110, 10),
         ("speed_cryoem", 60, 60), ("picking", 45, 30), ("speed_ana_bf16", 60, 45), ("amp_agreement", 120, 90))
FULL_METHOD = ("--initWeight", "iw-sample", "--updateLR", "ulr-adaptive", "--granularity", "label",
               "--sampling", "--trainingLabel", "pseudo", "--lr", "1e-3", "--weight_lr", "1e-3")
TABLE_HEAD = ("part", "check", "result", "value", "note")
PROCESS_START = time.monotonic()  # a constant of the process, for the progress lines


def build_parser():
    p = argparse.ArgumentParser(description="Check and time both trainers' GPU paths in one command; writes a "
                                            "JSON file and a Markdown table.")
    p.add_argument("--smoke", action="store_true", help="run every part on the CPU at tiny sizes (seconds each)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole check; a part gets at most what is left "
                        "(default: 480 on a GPU, 600 with --smoke)")
    p.add_argument("--parts", nargs="+", choices=[name for name, _, _ in PARTS], default=None,
                   help="run only these parts (default: all)")
    p.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and gpu_check.md "
                                                           "(default: %(default)s)")
    # internal: one part in a child process
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------- helpers of the parts

def _device(smoke):
    return torch.device("cpu" if smoke else "cuda")


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


def _python(args, env=None, timeout=None, **kwargs):
    """Run ``python args...`` in the repository root; returns the CompletedProcess (output captured)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)


def _say(message):
    """A progress line with the seconds since this process started (a part runs in its own process;
    a timeout's note shows the last of these lines)."""
    print(f"[{time.monotonic() - PROCESS_START:5.1f} s] {message}", flush=True)


def _tail(text, n=3):
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " / ".join(lines[-n:])[-400:]


def _killed_after_first_epoch(cmd, last_pt, timeout):
    """Start ``cmd``; SIGKILL it as soon as ``last_pt`` exists (written atomically after epoch 1).

    Its output goes to a file beside ``last_pt``'s folder: a pipe nobody reads would fill up
    with progress bars and stall the run before it ever writes ``last_pt``."""
    with open(last_pt.parent.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not last_pt.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.kill()
        proc.wait()
    return proc.returncode


def _max_diff(a, b):
    """Largest |a - b| over the floating tensors of two state dicts (or two tensors)."""
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return max((_max_diff(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor) and a[k].is_floating_point()),
               default=0.0)


def _compare_row(part, what, reference, other, metrics_ref, metrics_other, note=""):
    diff = _max_diff(reference, other)
    same_metrics = metrics_ref == metrics_other
    ok = diff == 0.0 and same_metrics
    return {"part": part, "check": what, "result": "pass" if ok else ("close" if diff < 1e-3 else "FAIL"),
            "value": f"max |d param| {diff:.2e}; test metrics {'equal' if same_metrics else 'differ'}",
            "note": note, "max_param_diff": diff, "metrics_equal": same_metrics}


# ----------------------------------------------------------------------------- correctness parts

def part_ana_resume(smoke, work):
    from datasets.synthetic_ana import generate_ana_demo
    device = _device(smoke)
    data = work / "data"
    n_train = 12 if smoke else 96
    generate_ana_demo(data, n_train=n_train, n_val=4, n_test=8, tiles_x=2, tiles_y=2, tile_size=64 if smoke else 128,
                      num_classes=4, max_labels=3, seed=1)
    base = ["--annFile", str(data / "annotations.csv"), "--imageDir", str(data / "images"), "--numClasses", "4",
            "--arch", "resnet18", "--imageSize", "32" if smoke else "128", "--tileSize", "64" if smoke else "128",
            "--no-pretrained", "--numWorkers", "0" if smoke else "2", "--trainBatchSize", "8" if smoke else "32",
            "--testBatchSize", "16" if smoke else "64", "--epoch", "2", "--seed", "3", "--deterministic",
            "--device", str(device), "--cacheDir", str(work / "cache"), *FULL_METHOD]
    _say("data written; main.py, 2 epochs")
    return _resume_and_torchrun(
        "ana_resume", "main.py", smoke, lambda name: ["main.py", *base, "--pathModelParams", str(work / name)],
        lambda name: work / name, "--loadModel", "output.txt",
        test_of=lambda run: json.loads((run / "results.json").read_text())[-1]["test_results"],
        params_of=lambda state: {**state["model"], "instance weights": state["weights"]["alpha"]})


def _resume_and_torchrun(part, what, smoke, command, run_dir, resume_flag, log_name, test_of, params_of):
    """An uninterrupted 2-epoch run, one killed after epoch 1 and resumed, and a 1-process torchrun
    run; rows comparing the last two with the first (parameters of ``params_of(last.pt)``, test
    metrics of ``test_of(run folder)``). ``command(name)``: the script and its flags for run ``name``."""
    rows, runs = [], {}
    full = _python(command("full"), timeout=600)
    if full.returncode:
        raise RuntimeError(f"{what} exited {full.returncode}: {_tail(full.stderr)}")
    runs["full"] = run_dir("full")
    _say("uninterrupted run done; the run to kill")
    rc = _killed_after_first_epoch(command("killed"), run_dir("killed") / "last.pt", 600)
    epoch = torch.load(run_dir("killed") / "last.pt", weights_only=True)["epoch"]
    resumed = _python([*command("killed"), resume_flag], timeout=600)
    if resumed.returncode:
        raise RuntimeError(f"resumed {what} exited {resumed.returncode}: {_tail(resumed.stderr)}")
    runs["killed"] = run_dir("killed")
    _say("resumed run done; torchrun")
    torchrun = _python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *command("torchrun")],
                       timeout=600)
    if torchrun.returncode:
        rows.append({"part": part, "check": "1-process torchrun", "result": "FAIL",
                     "value": f"exit {torchrun.returncode}", "note": _tail(torchrun.stderr)})
    else:
        runs["torchrun"] = run_dir("torchrun")
    params = {k: params_of(torch.load(p / "last.pt", weights_only=True)) for k, p in runs.items()}
    tests = {k: test_of(p) for k, p in runs.items()}
    row = _compare_row(part, f"{what} killed after epoch 1, resumed vs uninterrupted", params["full"],
                       params["killed"], tests["full"], tests["killed"],
                       note=f"kill -9 (exit {rc}) with last.pt at epoch {epoch}")
    if epoch != 1:
        row.update(result="FAIL", note=f"the kill came late: last.pt was at epoch {epoch}")
    rows.append(row)
    if "torchrun" in runs:
        log = (runs["torchrun"] / log_name).read_text()
        backend = "nccl" if "over nccl" in log else ("gloo" if "over gloo" in log else "no process group")
        row = _compare_row(part, f"{what} under 1-process torchrun vs plain", params["full"], params["torchrun"],
                           tests["full"], tests["torchrun"], note=f"DistributedDataParallel over {backend}")
        if backend != ("gloo" if smoke else "nccl"):
            row["result"] = "FAIL"
        rows.append(row)
    return rows


def part_cryoem_resume(smoke, work):
    import yaml

    from datasets.synthetic_cryoem import generate_cryoem_demo
    from utils.cryoem.config import default_config
    device = _device(smoke)
    data = generate_cryoem_demo(work / "data", n_pos=48 if smoke else 256, n_unl=192 if smoke else 1024,
                                n_val=64 if smoke else 128, n_test=64 if smoke else 128, patch_size=32 if smoke else 64,
                                seed=1)
    cfg = default_config()
    cfg["data"].update(data_dir=str(data), num_workers=0 if smoke else 2)
    cfg["training"].update(epochs=2, batch_size=16 if smoke else 64, device=str(device), deterministic=True,
                           early_stopping_patience=0)
    cfg_path = work / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    base = ["train_pu_selective_fixmatch.py", "--config", str(cfg_path), "--output-dir", str(work / "runs")]
    _say("data written; the trainer, 2 epochs")
    return _resume_and_torchrun(
        "cryoem_resume", "train_pu_selective_fixmatch.py", smoke, lambda name: [*base, "--exp-name", name],
        lambda name: work / "runs" / name, "--resume", "train.log",
        test_of=lambda run: json.loads((run / "results.json").read_text())["test"],
        params_of=lambda state: state["student"])


def part_weights(smoke, work):
    """InstanceWeights on the device and on the CPU, fed the same batches and gradients."""
    from models.sample_weights import InstanceWeights, init_weights
    device = _device(smoke)
    g = torch.Generator().manual_seed(0)
    n_tiles, n_classes, batch = (400, 6, 16) if smoke else (4000, 8, 32)
    labels = (torch.rand(n_tiles, n_classes, generator=g) < 0.3).double()
    labels[labels.sum(1) == 0, 0] = 1.0
    rows = []
    for update_lr in ("ulr-ones", "ulr-adaptive"):
        made = {}
        for dev in ("cpu", device):
            targets = labels.clone().to(dev)
            made[str(dev)] = InstanceWeights(init_weights(labels, "iw-sample", "label"), targets, lr=0.01,
                                             update_lr=update_lr, grouping="count", weight_decay=1e-4).to(dev)
        for epoch in range(3):
            for step in range(20):
                idx = torch.randint(0, n_tiles, (batch,), generator=g)
                grad = torch.rand(batch, n_classes, generator=g, dtype=torch.float64) * 1.5
                for dev, w in made.items():
                    w.step(idx.to(dev), grad.to(dev))
            flip = labels.clone()
            flip[torch.rand(n_tiles, generator=g) < 0.1, -1] = 1.0  # pseudo-labels change the groups
            for dev, w in made.items():
                w.end_epoch(flip.to(dev))
        a, b = made["cpu"].alpha, made[str(device)].alpha.cpu()
        diff = _max_diff(a, b)
        rows.append({"part": "weights", "check": f"instance weights {device} vs cpu ({update_lr})",
                     "result": "pass" if diff < 1e-5 else "FAIL", "value": f"max |d alpha| {diff:.2e}",
                     "note": f"{n_tiles} tiles x {n_classes} classes, 3 epochs of 20 steps, regrouped",
                     "max_diff": diff})
    return rows


def part_dense_map(smoke, work):
    """The dense picking map on the device vs the CPU (float32), with and without TF32 convolutions."""
    from datasets.cryoem_preprocess import prepare_micrograph
    from datasets.synthetic_micrographs import synthetic_micrograph
    from models.dense import probability_map
    from models.fixmatch_pu import FixMatchPUModel
    device = _device(smoke)
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=64).eval()
    size = 384 if smoke else 1024
    array, _ = synthetic_micrograph(size, 10, 40, 10, seed=0, local=True)
    image = prepare_micrograph(array, 1.0, "zscore", device="cpu")[0]
    cpu_map = probability_map(model, image, 192, 32, "dense", max_tile=None)
    model = model.to(device)
    rows = []
    for tf32 in (True, False):
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            dev_map = probability_map(model, image.to(device), 192, 32, "dense", max_tile=None).cpu()
        finally:
            torch.backends.cudnn.allow_tf32 = old
        diff = _max_diff(cpu_map, dev_map)
        tol = 5e-3 if tf32 else 1e-4
        rows.append({"part": "dense_map", "check": f"dense map {device} vs cpu, cuDNN TF32 {'on (default)' if tf32 else 'off'}",
                     "result": "pass" if diff <= tol else "FAIL", "value": f"max |d p| {diff:.2e}",
                     "note": f"{size} px micrograph, {tuple(cpu_map.shape)} cells, tolerance {tol:g}", "max_diff": diff})
    return rows


def part_amp_agreement(smoke, work):
    from benchmarks import amp_agreement
    from datasets.synthetic_cryoem import generate_cryoem_demo
    device = "cpu" if smoke else "cuda"
    if smoke:  # tiny data; on a GPU amp_agreement writes the CryoEM demo's own size
        generate_cryoem_demo(work / "cryoem", n_pos=24, n_unl=96, n_val=32, n_test=32, patch_size=32, seed=2)
    out = amp_agreement.main(["--device", device, "--data-dir", str(work / "cryoem"), "--epochs", "1" if smoke else "4",
                              "--ana-data-dir", str(work / "ana"), "--ana-epochs", "1" if smoke else "3",
                              "--ana-image-size", "32" if smoke else "128", "--num-workers", "0" if smoke else "4"])
    rows = []
    for family, keys in (("cryoem", ("auc", "ap", "f1")), ("ana", ("f1_mi", "f1_ma", "mAP"))):
        runs = out[family]
        diffs = {k: runs["amp"][k] - runs["float32"][k] for k in keys}
        worst = max(abs(v) for v in diffs.values())
        rows.append({"part": "amp_agreement", "check": f"{family}: test metrics, mixed precision - float32",
                     "result": "pass" if worst <= 0.05 else "differs", "value": ", ".join(
                         f"{k} {runs['float32'][k]:.3f}->{runs['amp'][k]:.3f}" for k in keys),
                     "note": "bf16 autocast forced on the CPU" if smoke else "the trainer's own AMP (bf16)",
                     "diffs": diffs})
    return rows


def _speed_ana(smoke, work, extra, label):
    from benchmarks import bench_ana
    device = _device(smoke)
    _peak_reset(device)
    size = (["--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
             "--n-train", "6", "--n-test", "3", "--num-workers", "0"] if smoke else
            ["--device", "cuda", "--arch", "resnet50", "--image-size", "224", "--batch-size", "32", "--epochs", "2",
             "--n-train", "96", "--n-test", "8", "--num-workers", "6"])
    r = bench_ana.main([*size, *extra])
    note = (f"plain BCE {r['plain_images_per_s']:.0f} img/s; method overhead {r['overhead_pct']:+.1f}%; data wait "
            f"{100 * r['method_data_fraction']:.1f}% of an epoch; test {r['test_images_per_s']:.0f} img/s")
    peak = _peak_mib(device)
    return [{"part": f"speed_ana_{label}", "check": f"ANA train images/s, {'resnet18 32 px' if smoke else 'resnet50 224 px'} "
                                                     f"batch {8 if smoke else 32}, {label}",
             "result": "info", "value": f"{r['method_images_per_s']:.1f} img/s"
                                         + (f", peak {peak} MiB" if peak is not None else ""),
             "note": note, **{k: v for k, v in r.items() if isinstance(v, (int, float))}, "peak_mib": peak}]


def part_speed_ana_fp32(smoke, work):
    return _speed_ana(smoke, work, ["--no-amp", "--no-channels-last"], "fp32")


def part_speed_ana_bf16(smoke, work):
    return _speed_ana(smoke, work, ["--amp", "--no-channels-last"], "bf16")


def part_speed_ana_bf16_cl(smoke, work):
    return _speed_ana(smoke, work, ["--amp", "--channels-last"], "bf16_cl")


def part_speed_ana_compile(smoke, work):
    if smoke:
        return [{"part": "speed_ana_compile", "check": "ANA train images/s, + torch.compile", "result": "skipped",
                 "value": "", "note": "--smoke: compiling takes minutes on a CPU"}]
    return _speed_ana(smoke, work, ["--amp", "--channels-last", "--compile"], "compile")


def part_speed_cryoem(smoke, work):
    from benchmarks import bench_cryoem
    device = _device(smoke)
    _peak_reset(device)
    argv = (["--device", "cpu", "--micrograph-size", "256", "--steps", "2", "--warmup", "1", "--rounds", "1",
             "--repeats", "1", "--loop-size", "64", "--batch-size", "8"] if smoke else
            ["--device", "cuda", "--steps", "40", "--repeats", "3"])
    r = bench_cryoem.main(argv)
    peak = _peak_mib(device)
    return [{"part": "speed_cryoem", "check": "CryoEM train patches/s, selective FixMatch vs supervised",
             "result": "info", "value": f"{r['fixmatch_patches_per_s']:.0f} vs {r['supervised_patches_per_s']:.0f} "
                                        f"patches/s ({r['fixmatch_cost_ratio']:.2f}x)"
                                        + (f", peak {peak} MiB" if peak is not None else ""),
             "note": f"patch {r['patch_size']} px, batch {r['batch_size']}"},
            {"part": "speed_cryoem", "check": f"dense vs crops picking, {r['micrograph_size']} px micrograph",
             "result": "info", "value": f"{r['dense_micrographs_per_s']:.2f} vs {r['crops_micrographs_per_s']:.3f} "
                                        f"micrographs/s",
             "note": f"dense/crop loop {r['dense_vs_loop_speedup']:.0f}x; max |p_dense - p_crops| "
                     f"{r['max_abs_prob_diff']:.3f}", **{k: v for k, v in r.items() if isinstance(v, (int, float))}}]


def part_picking(smoke, work):
    from datasets.synthetic_micrographs import synthetic_micrograph
    from models.fixmatch_pu import FixMatchPUModel
    from utils.picking.picker import PickSettings, pick_micrograph
    device = _device(smoke)
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=64).to(device).eval()
    size = 512 if smoke else 4096
    array, _ = synthetic_micrograph(size, 20, 200 if smoke else 3000, 50, seed=0, local=True)
    rows = []
    for downsample in (1, 2):
        settings = PickSettings(threshold=0.5, min_distance=40.0, downsample=float(downsample), normalization="zscore",
                                patch_size=192, stride=32)
        pick_micrograph(model, array, settings, device)  # warm-up (cuDNN autotuning)
        _peak_reset(device)
        seconds = []
        for _ in range(1 if smoke else 3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            pick_micrograph(model, array, settings, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        best = sorted(seconds)[len(seconds) // 2]
        peak = _peak_mib(device)
        rows.append({"part": "picking", "check": f"pick_micrograph {size}x{size}, downsample {downsample}",
                     "result": "info", "value": f"{1 / best:.2f} micrographs/s"
                                                + (f", peak {peak} MiB" if peak is not None else ""),
                     "note": "ResNet-18, window 64 + context 64, stride 32, tiles of 3072 px, NMS + refinement",
                     "micrographs_per_s": 1 / best, "peak_mib": peak})
    return rows


# ----------------------------------------------------------------------------- the driver

def run_part(name, smoke, budget, work):
    """One part in a child process (its own session, killed whole at the budget); returns its rows."""
    result = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--work", str(work / name),
           "--result", str(result)] + (["--smoke"] if smoke else [])
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        output, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        (work / f"{name}.log").write_text(output or "")
        return [{"part": name, "check": "(whole part)", "result": "timeout", "value": "",
                 "note": f"over its budget of {budget:.0f} s; last output: {_tail(output, 2)}"}], budget
    seconds = time.monotonic() - start
    (work / f"{name}.log").write_text(output or "")
    if proc.returncode or not result.is_file():
        return [{"part": name, "check": "(whole part)", "result": "error", "value": f"exit {proc.returncode}",
                 "note": _tail(output, 3)}], seconds
    return json.loads(result.read_text()), seconds


def environment(smoke):
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "mode": "smoke (CPU)" if smoke else "GPU"}
    if torch.cuda.is_available() and not smoke:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    return env


def markdown(env, rows):
    def cell(value):
        return str(value).replace("|", "/").replace("\n", " ")
    lines = ["env: " + " | ".join(f"{k} {v}" for k, v in env.items()), "",
             "| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join("---" for _ in TABLE_HEAD) + "|"]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in TABLE_HEAD) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv=None):
    """Run the chosen parts; print and write the table; return ``{"env": ..., "rows": [...]}``."""
    args = build_parser().parse_args(argv)
    if args.part:  # a child: one part, its rows to --result
        rows = globals()[f"part_{args.part}"](args.smoke, Path(args.work))
        Path(args.work).mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(json.dumps(rows, default=float))
        return rows
    if not args.smoke and not torch.cuda.is_available():
        raise UserError("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                        "run it with --smoke to exercise the same code on the CPU")
    budget = args.budget_s if args.budget_s is not None else (600.0 if args.smoke else 480.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.smoke)
    print("env: " + json.dumps(env), flush=True)
    start = time.monotonic()
    rows, timing = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, gpu_s, smoke_s in PARTS:
            if args.parts and name not in args.parts:
                continue
            left = budget - (time.monotonic() - start)
            part_budget = min(smoke_s if args.smoke else gpu_s, left)
            if part_budget < 5:
                rows.append({"part": name, "check": "(whole part)", "result": "skipped", "value": "",
                             "note": f"the check's budget of {budget:.0f} s is spent"})
                continue
            work = Path(tmp)
            part_rows, seconds = run_part(name, args.smoke, part_budget, work)
            for row in part_rows:
                row["seconds"] = round(seconds, 1)
            timing[name] = round(seconds, 1)
            rows.extend(part_rows)
            print(f"gpu_check: {name} done in {seconds:.0f} s: "
                  + ", ".join(f"{r['result']}" for r in part_rows), flush=True)
            log = work / f"{name}.log"
            if log.is_file():
                (out / "logs").mkdir(exist_ok=True)
                (out / "logs" / f"{name}.log").write_text(log.read_text())
    env["seconds"] = round(time.monotonic() - start, 1)
    table = markdown(env, rows)
    (out / "gpu_check.md").write_text(table)
    (out / "gpu_check.json").write_text(json.dumps({"env": env, "rows": rows, "part_seconds": timing}, indent=1,
                                                   default=float))
    print("\n" + table, flush=True)
    return {"env": env, "rows": rows}


if __name__ == "__main__":
    main()
