"""Worker for tests/test_rank_agreement.py: two gloo ranks check that they agree before and during a DP step.

    torchrun --nproc_per_node 2 tests/agreement_worker.py --cache DIR --mode ok|cache|noise
    torchrun --nproc_per_node 2 tests/agreement_worker.py --config CONFIG --mode late

mode cache: rank 1 reads DIR_stale (another copy of the private latent cache); mode noise: rank 1 draws its noise
from another seed; mode late: both ranks call ensure_cache on CONFIG's missing cache, rank 1 only once rank 0 has
written it (rank 1 then finds it fresh). Prints AGREED, or REFUSED <message> and exits 3.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpldm.data.latent_cache import LatentCache  # noqa: E402
from dpldm.distributed.agreement import cache_fingerprint, check_ranks_agree, check_same_value  # noqa: E402
from dpldm.distributed.env import init_distributed  # noqa: E402
from dpldm.errors import DpldmError  # noqa: E402
from dpldm.privacy.dp_step import add_noise_and_normalize, noise_generator  # noqa: E402


def late_cache(config: str, env) -> LatentCache:
    from dpldm.config import load_config
    from dpldm.data.latent_cache import cache_dir_for, encoder_identity, ensure_cache, is_fresh
    from dpldm.models.pipeline import load_pipeline
    cfg = load_config(config)
    vae = load_pipeline(cfg.model.pretrained).vae
    deadline = time.time() + 120
    while env.rank == 1 and not is_fresh(cache_dir_for(cfg), cfg, encoder_identity(vae)) and time.time() < deadline:
        time.sleep(0.2)
    return ensure_cache(cfg, vae, env)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache")
    ap.add_argument("--config")
    ap.add_argument("--mode", choices=["ok", "cache", "noise", "late"], required=True)
    args = ap.parse_args()
    env = init_distributed("gloo")
    odd = env.rank == 1
    if args.mode == "late":
        cache = late_cache(args.config, env)
    else:
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
