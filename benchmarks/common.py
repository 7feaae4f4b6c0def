"""Flags the speed benchmarks share: the seed and the trainers' GPU fast path."""
import argparse


def add_fast_path_flags(parser, trainer, amp_flag, channels_last_flag, seeded):
    """``--seed`` (of ``seeded``), ``--amp`` and ``--channels-last``, described as ``trainer``'s
    ``amp_flag`` / ``channels_last_flag`` (no-ops on the CPU, where the trainers run in float32)."""
    parser.add_argument("--seed", type=int, default=0, help=f"seed of {seeded} (default: %(default)s)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help=f"mixed precision on a GPU for both paths, as {trainer}'s {amp_flag} (default: on; "
                             f"float32 on the CPU, as {trainer})")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help=f"channels-last model and batches on a GPU for both paths, as {trainer}'s "
                             f"{channels_last_flag} (default: on; no effect on the CPU)")
