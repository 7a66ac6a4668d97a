"""Worker for tests/test_rank_agreement.py: two gloo ranks check that they agree before and during a DP step.

    torchrun --nproc_per_node 2 tests/agreement_worker.py --cache DIR --mode ok|cache|noise

mode cache: rank 1 reads DIR_stale (another copy of the private latent cache); mode noise: rank 1 draws its noise
from another seed. Prints AGREED, or REFUSED <message> and exits 3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpldm.data.latent_cache import LatentCache  # noqa: E402
from dpldm.distributed.agreement import cache_fingerprint, check_ranks_agree, check_same_value  # noqa: E402
from dpldm.distributed.env import init_distributed  # noqa: E402
from dpldm.errors import DpldmError  # noqa: E402
from dpldm.privacy.dp_step import add_noise_and_normalize, noise_generator  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--mode", choices=["ok", "cache", "noise"], required=True)
    args = ap.parse_args()
    env = init_distributed("gloo")
    odd = env.rank == 1
    cache = LatentCache(args.cache + ("_stale" if args.mode == "cache" and odd else ""))
    try:
        check_ranks_agree("finetune start", {"N": len(cache), "cache": cache_fingerprint(cache)})
        noise = noise_generator(7 + (1 if args.mode == "noise" and odd else 0), 0)
        add_noise_and_normalize({"w": torch.zeros(100)}, 1.0, 1.0, 4.0, noise)
        check_same_value("finetune step 0", noise.checksum)
    except DpldmError as e:
        print(f"REFUSED rank {env.rank}: {e}", flush=True)
        return 3
    print(f"AGREED rank {env.rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
