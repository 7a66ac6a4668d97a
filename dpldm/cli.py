"""`dpldm <verb>`: one entry point. Each verb's work lives in its module, imported only when run,
so `dpldm --help` stays fast. Errors meant for the user (DpldmError) print as one line, exit 2."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from dpldm.errors import DpldmError
from dpldm.log import log


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. privacy.target_epsilon=1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpldm", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    # data -------------------------------------------------------------------------------------
    data = verbs.add_parser("data", help="pack images into webdataset shards; inspect shards")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    pack = data_verbs.add_parser("pack", help="write webdataset shards (img2dataset layout)")
    pack.add_argument("source", help="mnist | fashion-mnist | digits | glyphs:digits | glyphs:letters | folder:PATH | "
                      "captions:FILE.jsonl")
    pack.add_argument("--out", required=True, help="output directory for shard-NNNNNN.tar")
    pack.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    pack.add_argument("--split", choices=["train", "test"], default="train")
    pack.add_argument("--limit", type=int, default=0, help="pack only the first N samples (0 = all)")
    pack.add_argument("--format", choices=["png", "jpg"], default="png", help="image encoding")
    pack.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier pack in --out")
    pack.add_argument("--workers", type=int, default=0, help="processes writing shards (0 = one per CPU, max 8)")
    pack.add_argument("--private", action="store_true",
                      help="mark the set private in dataset.json (inspect then writes no image grid by default)")
    pack.set_defaults(handler="dpldm.data.pack:main")
    insp = data_verbs.add_parser("inspect", help="sample count, class histogram, sizes, grid PNG")
    insp.add_argument("shards", help="shard directory, brace pattern or pipe: URL")
    insp.add_argument("--grid", default="", help="grid PNG path (default DIR/inspect_grid.png)")
    insp.set_defaults(handler="dpldm.data.inspect:main")

    # config -----------------------------------------------------------------------------------------
    cfg = verbs.add_parser("config", help="show a preset fully resolved, with each field's help")
    cfg_verbs = cfg.add_subparsers(dest="config_verb", required=True, metavar="ACTION")
    show = cfg_verbs.add_parser("show", help="print CONFIG + overrides resolved, each field with its help")
    _config_args(show)
    show.set_defaults(handler="dpldm.config:show_main")

    # pretrain ---------------------------------------------------------------------------------
    pre = verbs.add_parser("pretrain", help="public (non-private) pretraining")
    pre.add_argument("what", choices=["autoencoder", "unet"])
    _config_args(pre)
    pre.set_defaults(handler="dpldm.train.pretrain:main")

    # encode / finetune ------------------------------------------------------------------------
    enc = verbs.add_parser("encode", help="encode the private shards once into the latent cache")
    _config_args(enc)
    enc.set_defaults(handler="dpldm.data.latent_cache:main")
    ft = verbs.add_parser("finetune", help="DP fine-tune adapters (resume by re-running)")
    _config_args(ft)
    ft.set_defaults(handler="dpldm.train.finetune:main")

    # sample / export --------------------------------------------------------------------------
    smp = verbs.add_parser("sample", help="generate class- or text-conditioned images from a run")
    smp.add_argument("run", help="run directory (or a diffusers pipeline folder)")
    smp.add_argument("--out", default="", help="output directory (default RUN/samples)")
    smp.add_argument("--class", dest="class_id", type=int, default=None, help="one class id")
    smp.add_argument("--prompt", default=None, help="a text prompt")
    smp.add_argument("--prompts-file", default=None, help="file with one prompt per line")
    smp.add_argument("--n", type=int, default=None, help="number of images (all classes balanced)")
    smp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    smp.add_argument("--steps", type=int, default=None, help="sampler steps")
    smp.add_argument("--scheduler", choices=["ddim", "dpm++", "euler"], default=None)
    smp.add_argument("--seed", type=int, default=None)
    smp.add_argument("--batch-size", type=int, default=None)
    smp.add_argument("--resolution", type=int, default=None, help="pixels (multiple of the VAE factor)")
    smp.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                     help="auto: bf16 where the device has it natively (dpldm/precision.py)")
    smp.set_defaults(handler="dpldm.sample:main")
    exp = verbs.add_parser("export", help="write a plain-diffusers pipeline folder with adapters")
    exp.add_argument("run", help="run directory")
    exp.add_argument("--out", required=True, help="output pipeline folder")
    exp.set_defaults(handler="dpldm.models.export:main")

    # evaluate / privacy / audit ---------------------------------------------------------------
    ev = verbs.add_parser("evaluate", help="downstream accuracy, FID and privacy report of runs")
    ev.add_argument("runs", nargs="+", help="run directories with samples (from `dpldm sample`)")
    ev.add_argument("--real-train", default="", help="real private train shards (No-DP / DP-SGD baselines)")
    ev.add_argument("--real-test", required=True, help="real test shards")
    ev.add_argument("--out", default="", help="report directory (default: first RUN/report)")
    ev.add_argument("--classifier", choices=["cnn", "resnet9"], default=None)
    ev.add_argument("--augment", choices=["none", "affine"], default=None,
                    help="the synthetic-data classifiers' training views (the real-data baselines use none)")
    ev.add_argument("--label-smoothing", type=float, default=None,
                    help="the classifiers' label smoothing in [0, 1): the runs' and the DP-SGD baseline's (No DP: 0)")
    ev.add_argument("--seeds", type=int, default=None)
    ev.add_argument("--epochs", type=int, default=None)
    ev.add_argument("--no-fid", action="store_true")
    ev.add_argument("--baselines", action="store_true", help="also train No-DP and DP-SGD classifiers")
    ev.set_defaults(handler="dpldm.eval.evaluate:main")

    pv = verbs.add_parser("privacy", help="accountant: epsilon for a noise level, or noise for a budget")
    pv_verbs = pv.add_subparsers(dest="privacy_verb", required=True, metavar="ACTION")
    for name, helptext in (("epsilon", "epsilon spent by T steps"), ("noise", "noise multiplier for a target epsilon")):
        sp = pv_verbs.add_parser(name, help=helptext)
        if name == "epsilon":
            sp.add_argument("--noise-multiplier", type=float, required=True)
        else:
            sp.add_argument("--epsilon", type=float, required=True)
        sp.add_argument("--sample-rate", type=float, required=True)
        sp.add_argument("--steps", type=int, required=True)
        sp.add_argument("--delta", type=float, required=True)
        sp.add_argument("--dataset-size", type=int, default=None, help="N, to check delta < 1/N")
        sp.add_argument("--accountant", choices=["rdp", "prv", "pld", "dpa_rdp"], default="prv")
        sp.add_argument("--relation", choices=["add_remove", "replace_one"], default="add_remove",
                        help="neighbouring relation (replace_one needs --accountant pld)")
        sp.set_defaults(handler="dpldm.privacy.accountant:main")

    au = verbs.add_parser("audit", help="empirical privacy audit with canaries")
    _config_args(au)
    au.add_argument("--canaries", type=int, default=64, help="canaries, each inserted with probability 1/2")
    au.add_argument("--guesses", type=int, default=0, help="in/out guesses (default: half the canaries)")
    au.add_argument("--beta", type=float, default=0.05, help="1 - confidence of the epsilon lower bound")
    au.add_argument("--out", default="", help="audit directory (default: output.dir)")
    au.set_defaults(handler="dpldm.privacy.audit:main")

    qs = verbs.add_parser("quickstart", help="the embedded end-to-end demo (offline, CPU)")
    qs.add_argument("--out", default="runs/quickstart")
    qs.add_argument("--fast", action="store_true", help="~3-minute smoke version")
    qs.add_argument("--plan", choices=["full", "long"], default="full",
                    help="full: 19-30 minutes on 2 CPU cores, by machine (docs/results.md); "
                         "long: ~5x pretraining, DP batch, samples")
    qs.set_defaults(handler="dpldm.recipes.quickstart:main")

    tp = verbs.add_parser("tune-proxy", help="choose the quickstart's fine-tune settings on a public proxy set")
    tp.add_argument("--out", default="runs/quickstart", help="shares the quickstart's public pipeline")
    tp.add_argument("--fast", action="store_true", help="smoke version (3 candidates, tiny sizes)")
    tp.add_argument("--epsilons", type=float, nargs="+", default=[10.0],
                    help="private-run eps whose noise each candidate gets; the first selects")
    tp.add_argument("--candidates", nargs="+", default=None, metavar="NAME",
                    help="a subset of dpldm.recipes.tune_proxy.CANDIDATES (default: all)")
    tp.add_argument("--repeats", type=int, default=1,
                    help="independent fine-tunes per candidate, scored by their mean (one run's spread is ~1-2 points)")
    tp.set_defaults(handler="dpldm.recipes.tune_proxy:main")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = args.handler.split(":")
    # lazy on purpose: a verb imports only its own module (torch, diffusers...), so `dpldm --help` stays fast
    module = importlib.import_module(module_name)
    try:
        return getattr(module, func_name)(args) or 0
    except DpldmError as e:
        log(f"dpldm {args.verb}: error: {e}", all_ranks=True, err=True)
        return 2
    except KeyboardInterrupt:
        log(f"dpldm {args.verb}: interrupted", all_ranks=True, err=True)
        return 130
    except BrokenPipeError:           # output piped into `head` & co.: the reader is gone, not an error
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
