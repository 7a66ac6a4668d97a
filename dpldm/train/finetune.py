"""`dpldm finetune CONFIG [overrides]`: DP fine-tuning of adapters inside a frozen latent U-Net.

One logical step (identical on 1 or many ranks, for any micro-batch size):
  1. the global Poisson sampler draws the step's indices (each example independently with prob. q);
     every rank holds the same sampler state and takes its own slice;
  2. each example draws K (timestep, noise) pairs from a generator keyed by (seed, step, index);
     its loss is the mean of its K losses (noise multiplicity);
  3. per-example gradients of the trainable parameters only, each clipped to C, summed;
  4. the sums are all-reduced; every rank adds the same N(0, σ²C²) noise (drawn once per logical step
     from a generator keyed by (seed, step)) and divides by the expected batch size q·N;
  5. the optimizer steps. The ledger (privacy.json) is updated at every checkpoint.
`privacy.enabled=false` runs the same loop with plain summed gradients, no clipping and no noise.
"""
from __future__ import annotations

import copy
import json
import math
import re
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.func import functional_call

from dpldm.config import Config, apply_mapping, load_config, save_config
from dpldm.data.latent_cache import LatentCache, ensure_cache
from dpldm.data.poisson import PoissonSampler, split_for_rank
from dpldm.distributed.agreement import cache_fingerprint, check_ranks_agree, check_same_value
from dpldm.distributed.env import all_reduce_sum_, init_distributed
from dpldm.errors import DpldmError
from dpldm.log import log
from dpldm.models.adapters import attach_adapter, parameter_table, save_adapter, trainable_named_parameters
from dpldm.models.diffusion_loss import diffusion_loss, example_draws
from dpldm.models.ema import EMA
from dpldm.models.pipeline import class_prompts, encode_prompts, load_pipeline
from dpldm.privacy import accountant as acc
from dpldm.privacy.dp_step import add_noise_and_normalize, assert_dp_compatible, clipped_grad_sum, noise_generator
from dpldm.privacy.ghost_clipping import choose_engine, ghost_clipped_grad_sum
from dpldm.privacy.ledger import Ledger
from dpldm.privacy.run_seed import run_seed, seed_path
from dpldm.rng import RunRandomness
from dpldm.run_dir import RunDir
from dpldm.train.trainer import Trainer, latest_checkpoint


def example_flips(seed: int, step: int, indices) -> np.ndarray:
    """Which view (original / horizontally flipped) each example uses this step (data.flip)."""
    rng = RunRandomness(seed)
    return np.array([rng.numpy("flip", step, int(i)).random() < 0.5 for i in indices], dtype=bool)


class ConditionEncoder:
    """Maps cache records to U-Net conditioning: class prompts (cached table) or captions."""

    def __init__(self, comps, cfg: Config, cache: LatentCache, device):
        self.comps, self.device = comps, device
        self._encode = partial(encode_prompts, comps)
        meta = getattr(comps, "meta", {}) or {}
        # the private set's classes: named in the config, else the pipeline's own, else "0".."K-1"
        if cfg.model.class_names:
            self.class_names, template = list(cfg.model.class_names), cfg.model.prompt_template
            self.names_source = "config"
        else:
            self.class_names = list(meta.get("class_names") or [])
            template = meta.get("prompt_template") or cfg.model.prompt_template
            self.names_source = "pipeline"
        self.template = template
        self.use_labels = bool(cache.meta.get("labels_present")) and not any(cache.texts)
        self.null = self._encode([""]).to(device)[0]
        self.table = None
        if self.use_labels:
            n_classes = int(cache.labels.max()) + 1
            if len(self.class_names) < n_classes:
                if self.class_names:
                    raise DpldmError(f"model: the pipeline names {len(self.class_names)} classes but the private "
                                     f"data has labels up to {n_classes - 1}")
                self.class_names = [str(i) for i in range(n_classes)]
                self.names_source = "private labels"     # their number is a statistic of the private set
            self.prompts = class_prompts(self.class_names, template)
            self.table = self._encode(self.prompts).to(device)

    def __call__(self, batch: dict, drop: torch.Tensor) -> torch.Tensor:
        if self.use_labels:
            if (batch["labels"] < 0).any():
                raise DpldmError("data.private: an example has no label although the set is class-conditional")
            cond = self.table[batch["labels"].to(self.device)]
        elif len(batch["texts"]):
            cond = self._encode(batch["texts"]).to(self.device)
        else:
            cond = self.null.expand(0, *self.null.shape)
        if len(cond):
            cond = torch.where(drop.to(self.device)[:, None, None], self.null.expand_as(cond), cond)
        return cond


EMA_FILE = "ema.safetensors"   # inside a checkpoint: the iterate average (train.ema_decay)


class FinetuneTrainer(Trainer):
    def __init__(self, cfg, run_dir, comps, cache: LatentCache, trainable, total_steps, env, ledger: Ledger,
                 sampler: PoissonSampler, device, seed: int):
        super().__init__(cfg, run_dir, comps.unet, trainable, total_steps, env)
        self.comps, self.cache, self.ledger, self.sampler, self.device = comps, cache, ledger, sampler, device
        self.seed = seed                      # the run's secret seed (dpldm/privacy/run_seed.py): never logged
        self.cond = ConditionEncoder(comps, cfg, cache, device)
        self.alphas = comps.scheduler.alphas_cumprod.to(device)
        self.private = cfg.privacy.enabled
        self.clip = cfg.privacy.max_grad_norm if cfg.privacy.enabled else None
        self.sigma = ledger.noise_multiplier
        self.clip_groups = clip_groups(cfg.privacy.clip_groups, list(trainable)) if self.private else None
        self.ema = EMA(self.engine.params(), cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.clipping, engine_line = choose_engine(cfg.privacy.clipping, self.module, self.engine.params())
        if self.private:
            log(engine_line)
        self._eps_cache: tuple[int, float] | None = None

    def _batch_loss_fn(self, params, x0, cond, t, noise):
        """Per-example losses [b] of a micro-batch, the module run with `params` swapped in (b·K rows inside)."""
        unet = self.module

        def call(x_t, tt, c):
            return functional_call(unet, params, (x_t, tt), {"encoder_hidden_states": c, "return_dict": False})[0]
        return diffusion_loss(call, self.alphas, x0, cond, t, noise, self.cfg.model.prediction_type)

    def _loss_fn(self, params, x0, cond, t, noise):
        """The loss of ONE example (no batch dimension), for torch.func's vmap(grad)."""
        return self._batch_loss_fn(params, x0[None], cond[None], t[None], noise[None])[0]

    def _clipped_grad_sum(self, tensors) -> dict:
        """The clipped per-example gradient sum of this rank's examples, by the chosen engine (same result)."""
        mb, params = self.cfg.train.microbatch_size, self.engine.params()
        if self.clipping == "ghost":
            grad_sum, _ = ghost_clipped_grad_sum(self.module, params, self._batch_loss_fn, tensors, self.clip, mb,
                                                 self.clip_groups, rows_per_example=self.cfg.privacy.noise_multiplicity)
        else:
            grad_sum, _ = clipped_grad_sum(self._loss_fn, params, tensors, self.clip, mb, self.clip_groups)
        return grad_sum

    def _plain_grad_sum(self, batch) -> tuple[dict, dict]:
        """Non-private: summed (unclipped) gradients by ordinary backprop, in micro-batches."""
        params = self.engine.params()
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_sum, n = 0.0, len(batch[0])
        mb = max(1, self.cfg.train.microbatch_size)
        for s in range(0, n, mb):
            x0, cond, t, noise = (b[s:s + mb] for b in batch)

            def call(x_t, tt, c):
                return self.module(x_t, tt, encoder_hidden_states=c, return_dict=False)[0]
            losses = diffusion_loss(call, self.alphas, x0, cond, t, noise, self.cfg.model.prediction_type)
            grads = torch.autograd.grad(losses.sum(), list(params.values()))
            for k, g in zip(params, grads):
                total[k] += g
            loss_sum += float(losses.sum())
        return total, {"n": n, "loss_sum": loss_sum}

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        indices = self.sampler.next_indices()
        local = split_for_rank(indices, self.env.rank, self.env.world_size)
        flips = example_flips(self.seed, step, local) if self.cache.flipped is not None else None
        batch = self.cache.get(local, flips)
        t, noise, drop = example_draws(self.seed, step, local, cfg.privacy.noise_multiplicity,
                                       self.cache.latent_shape, self.comps.scheduler.config.num_train_timesteps,
                                       cfg.model.cond_dropout)
        cond = self.cond(batch, drop)
        tensors = (batch["latents"].to(self.device), cond, t.to(self.device), noise.to(self.device))
        expected = cfg.privacy.expected_batch_size
        if not self.private:      # the No-DP baseline: exact loss and batch size are its to print
            grad_sum, stats = self._plain_grad_sum(tensors)
            counts = {"n": torch.tensor([float(stats["n"]), stats["loss_sum"]])}
            all_reduce_sum_(grad_sum)
            all_reduce_sum_(counts)
            n_global, loss_global = int(counts["n"][0]), float(counts["n"][1])
            self._optimizer_step({k: v / expected for k, v in grad_sum.items()})
            return {"loss": loss_global / n_global if n_global else float("nan"), "samples": n_global}
        # private: the clipped sum's statistics (loss, norms, clipped count) and the drawn batch size are
        # private and are dropped here; only the noised gradient leaves this method (privacy invariant 8)
        grad_sum = self._clipped_grad_sum(tensors)
        all_reduce_sum_(grad_sum)
        noise = noise_generator(self.seed, step, device=self.device, secure=cfg.privacy.secure_rng)
        grads = add_noise_and_normalize(grad_sum, self.sigma, self.clip, expected, noise)
        check_same_value(f"finetune step {step}", noise.checksum)
        self._optimizer_step(grads)
        return {"samples": expected}     # throughput from the expected batch size, not the drawn one

    def _optimizer_step(self, grads: dict) -> None:
        self.engine.set_grads(grads)
        self.engine.step()
        if self.ema is not None:
            self.ema.update(self.engine.params())

    def epsilon_at(self, steps: int) -> float:
        if self._eps_cache is None or self._eps_cache[0] != steps:
            self._eps_cache = (steps, self.ledger.spend(steps) if self.private and self.sigma > 0 else math.inf)
        return self._eps_cache[1]

    def progress_fields(self) -> str:
        if not self.private:
            return " | NOT PRIVATE (privacy.enabled=false)"
        eps = self.epsilon_at(self.step)
        return f" | eps {eps:.3g}/{self.ledger.target_epsilon:g}" + (" NOT PRIVATE" if self.sigma == 0 else "")

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.ema is not None:
            path = self.latest_checkpoint() / EMA_FILE
            if not path.is_file():
                raise DpldmError(f"{path} is missing: this checkpoint was written without train.ema_decay; "
                                 "resume with the settings the run started with")
            self.ema.load_state_dict(load_file(str(path)))

    def write_checkpoint_files(self, folder: Path) -> None:
        if self.ema is not None:
            save_file(self.ema.state_dict(), str(folder / EMA_FILE))

    def on_checkpoint(self, step: int) -> None:
        """Ledger first, then the adapter (the EMA of the iterates when train.ema_decay > 0): a published
        adapter is never ahead of its ledger."""
        if self.env.is_main:
            self.epsilon_at(step)
            self.ledger.steps = step
            self.ledger.save(self.run_dir)
            params = self.engine.params()
            last = {k: v.detach().clone() for k, v in params.items()} if self.ema is not None else None
            if self.ema is not None:
                self.ema.copy_to(params)
            save_adapter(self.module, self.cfg.adapter, RunDir(self.run_dir).adapter)
            if last is not None:
                with torch.no_grad():
                    for k, v in params.items():
                        v.copy_(last[k])


def clip_groups(patterns: list[str], names: list[str]) -> list[list[str]] | None:
    """privacy.clip_groups → a partition of the trainable names: one group per pattern (first match
    wins) plus the unmatched rest; None (flat clipping) when no pattern is given."""
    if not patterns:
        return None
    groups: list[list[str]] = [[] for _ in patterns] + [[]]
    for name in names:
        hit = next((i for i, p in enumerate(patterns) if re.search(p, name)), len(patterns))
        groups[hit].append(name)
    for pattern, members in zip(patterns, groups):
        if not members:
            raise DpldmError(f"privacy.clip_groups: {pattern!r} matches no trainable parameter")
    return [g for g in groups if g]


def plan(cfg: Config, n: int) -> tuple[float, int, float]:
    """Sample rate q, number of logical steps T and noise multiplier σ for this config and N."""
    p = cfg.privacy
    if p.expected_batch_size <= 0 or p.expected_batch_size > n:
        raise DpldmError(f"privacy.expected_batch_size must be in [1, N={n}]; got {p.expected_batch_size}")
    q = p.expected_batch_size / n
    steps = cfg.train.steps or math.ceil(cfg.train.epochs / q)
    if steps <= 0:
        raise DpldmError("train.steps (or train.epochs) must be > 0")
    if not p.enabled:
        return q, steps, 0.0
    acc.validate(q, p.delta, noise_multiplier=p.noise_multiplier, steps=steps, dataset_size=n)
    sigma = p.noise_multiplier if p.noise_multiplier is not None else \
        acc.noise_multiplier_for(p.target_epsilon, q, steps, p.delta, p.accountant, p.relation)
    return q, steps, float(sigma)


def new_ledger(cfg: Config, n: int, q: float, sigma: float) -> Ledger:
    p = cfg.privacy
    warnings = []
    if not p.enabled:
        warnings.append("NOT PRIVATE: privacy.enabled=false (no clipping, no noise): the No-DP baseline")
    elif sigma == 0:
        warnings.append("NOT PRIVATE: noise multiplier is 0 (clipping only): epsilon is infinite")
    return Ledger(epsilon=0.0, delta=p.delta, target_epsilon=p.target_epsilon, accountant=p.accountant,
                  noise_multiplier=sigma, sample_rate=q, steps=0, max_grad_norm=p.max_grad_norm,
                  noise_multiplicity=p.noise_multiplicity, clip_groups=list(p.clip_groups), dataset_size=n,
                  expected_batch_size=p.expected_batch_size, relation=p.relation,
                  seed="secret" if cfg.seed is None else "explicit", secure_rng=p.secure_rng, sampling="poisson",
                  private=bool(p.enabled and sigma > 0), warnings=warnings, history=[])


def run_finetune(cfg: Config) -> Path:
    # torch.func has no batching rule for CPU flash attention and says so every step; results are exact
    warnings.filterwarnings("ignore", message=".*batching rule for aten::_scaled_dot_product.*")

    env = init_distributed(cfg.distributed.backend)
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    run_dir = Path(cfg.output.dir)
    if not cfg.model.pretrained:
        raise DpldmError("model.pretrained: set it to a diffusers pipeline folder (Stable-Diffusion layout)")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, RunDir(run_dir).config)
    comps = load_pipeline(cfg.model.pretrained, device=str(device))
    cfg = images_as_the_autoencoder_takes_them(cfg, comps.vae, env)
    cache = ensure_cache(cfg, comps.vae, env)
    n = len(cache)
    q, steps, sigma = plan(cfg, n)
    fresh = new_ledger(cfg, n, q, sigma)
    ledger = fresh
    if Ledger.exists(run_dir):
        ledger = Ledger.load(run_dir)
        ledger.check_same_mechanism(**{k: getattr(fresh, k) for k in (
            "sample_rate", "noise_multiplier", "max_grad_norm", "clip_groups", "noise_multiplicity",
            "dataset_size", "expected_batch_size", "accountant", "delta", "private", "relation", "seed",
            "secure_rng")})
        check_spent_steps_resumable(ledger, run_dir)
    if ledger.private:
        ledger.check_budget(steps)
    seed, _ = run_seed(cfg.seed, run_dir, env)
    torch.manual_seed(RunRandomness(seed).int_seed("init"))   # adapter init: data-independent, same on every rank
    attach_adapter(comps.unet, cfg.adapter)
    comps.unet.to(device)
    trainable = trainable_named_parameters(comps.unet)
    assert_dp_compatible(comps.unet)
    log(parameter_table(comps.unet))
    for w in dict.fromkeys(ledger.warnings):
        log(f"!!! {w}")
    groups = f" groups={cfg.privacy.clip_groups}" if cfg.privacy.clip_groups else ""
    log(f"finetune: N={n} q={q:.5g} steps={steps} sigma={sigma:.4g} C={cfg.privacy.max_grad_norm}{groups} "
        f"K={cfg.privacy.noise_multiplicity} accountant={cfg.privacy.accountant} ({cfg.privacy.relation}) "
        f"target eps={cfg.privacy.target_epsilon} delta={cfg.privacy.delta} ranks={env.world_size} "
        f"seed={'explicit' if cfg.seed is not None else 'secret'}{' secure_rng' if cfg.privacy.secure_rng else ''}")
    sampler = PoissonSampler(n, q, seed, secure=cfg.privacy.secure_rng)
    trainer = FinetuneTrainer(cfg, run_dir, comps, cache, trainable, steps, env, ledger, sampler, device, seed)
    check_ranks_agree("finetune start", {  # one example on two ranks, or two seeds, would break the sensitivity
        "N": n, "cache": cache_fingerprint(cache), "seed": RunRandomness(seed).int_seed("agreement"),
        "sampler": sampler.state_dict(), "sigma": sigma, "steps": steps})
    if env.is_main and trainer.cond.use_labels:  # the prompts `dpldm sample` must use for this run
        RunDir(run_dir).classes.write_text(json.dumps(
            {"class_names": trainer.cond.class_names, "prompt_template": trainer.cond.template,
             "source": trainer.cond.names_source}, indent=2))
    trainer.fit()
    if ledger.private:
        log(f"finetune: done, ({ledger.epsilon:.4g}, {ledger.delta:g})-DP spent ({ledger.accountant})")
    return run_dir


def images_as_the_autoencoder_takes_them(cfg: Config, vae, env) -> Config:
    """The private images are read with the channels the pipeline's autoencoder takes (gray images are
    converted to RGB and back as needed): a preset's `model.channels` never wins over the folder the user
    pointed at. `model.resolution` stays the user's choice (SD autoencoders are fully convolutional) but must
    be a multiple of the autoencoder's downsampling factor."""
    channels = int(vae.config.in_channels)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.model.resolution % factor:
        raise DpldmError(f"model.resolution={cfg.model.resolution} must be a multiple of the autoencoder's "
                         f"downsampling factor {factor} ({cfg.model.pretrained}/vae)")
    if cfg.model.channels != channels:
        log(f"finetune: {cfg.model.pretrained}/vae takes {channels}-channel images; reading the private images "
            f"with {channels} channels (config said model.channels={cfg.model.channels})")
        cfg = apply_mapping(copy.deepcopy(cfg), {"model.channels": channels})
    return cfg


def check_spent_steps_resumable(ledger: Ledger, run_dir: Path) -> None:
    """A run directory whose ledger has spent steps must resume from a checkpoint at (or past) the ledger's step,
    with its secret seed: a restart from step 0 would spend the budget again under a ledger that forgets the
    first spending (and, with another seed or lr, release a second model trained on the same data)."""
    if ledger.steps == 0:
        return
    run = RunDir(run_dir)
    newest = latest_checkpoint(run.checkpoints)
    last = int(newest.name.split("-")[1]) if newest else None
    problem = None
    if last is None or last < ledger.steps:
        problem = (f"no checkpoint at step >= {ledger.steps} in {run.checkpoints}"
                   + (f" (newest: step {last})" if last is not None else ""))
    elif not seed_path(run_dir).exists():
        problem = f"its secret seed {seed_path(run_dir)} is missing"
    if problem:
        raise DpldmError(f"privacy ledger: {run.ledger} records {ledger.steps} spent steps "
                         f"(epsilon {ledger.epsilon:.4g}) but {problem}: refusing to restart from step 0, which "
                         "would spend the budget again; start a new run directory (output.dir=...)")


def main(args) -> int:
    run_finetune(load_config(args.config, args.overrides))
    return 0
