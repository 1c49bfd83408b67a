"""``sparsellm-prune``: the command line over :func:`sparsellm.api.run`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from . import __version__
from .config import (CPU_GEMMS, DEFAULT_MODEL, DEFAULT_SPARSITY, DTYPES, EXPORT_KINDS, PRODUCT_PRECISIONS,
                     SAVE_FORMATS, STRUCTURES, AllocationSettings, ElsaSettings, PruneConfig, SparseLLMSettings)
from .sparsity import SparsityPattern, SparsityError


def parse_layers(text: str) -> tuple[int, int]:
    """``--layers START:STOP`` (half-open; an empty STOP runs to the last layer)."""
    try:
        start, stop = (int(p) if p else None for p in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers expects START:STOP (half-open, e.g. 0:15), got {text!r}")
    return (start or 0, stop)  # stop None: to the last layer


def _sparsity(text: str) -> SparsityPattern:
    try:
        return SparsityPattern.parse(text)
    except SparsityError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated numbers, got {text!r}") from None


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning):
    """The package's own warnings (settings a run does not read) as one line, as its errors are,
    not as a file, line number and source line; any other warning as Python writes it."""
    if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(_PACKAGE + os.sep):
        return f"sparsellm-prune: warning: {message}\n"
    return _default(message, category, filename, lineno, line)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" where it informs: not to a help text that states its own default,
    not to a switch (a store_true/store_false default only says the switch is off), not for None."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS
    from .methods import sparsellm as sparsellm_solver, structprune as structprune_solver
    from .ops import BACKENDS

    d = PruneConfig()
    s = SparseLLMSettings()
    p = argparse.ArgumentParser(
        prog="sparsellm-prune",
        description="Prune a causal language model layer by layer and report dense and pruned perplexity.",
        formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"sparsellm {__version__}")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="local folder or hub id; 'smollm2' is the embedded SmolLM2-135M-Instruct (offline)")
    p.add_argument("--method", default=d.method, choices=sorted(METHODS), help="pruning method (README, Methods)")
    # default None, as PruneConfig's: --structure heads removes no FFN channel and must tell a
    # share the user gave (refused) from the default (unused)
    p.add_argument("--sparsity", type=_sparsity, default=None,
                   help="unstructured fraction pruned (0.7) or N:M with N pruned of every M consecutive "
                        "input weights (3:4 = 75%% sparse, 2:4 = 50%%); with --structure channels*: the share "
                        f"of FFN channels removed (default: {DEFAULT_SPARSITY}; not used by --structure heads)")
    a = AllocationSettings()
    g = p.add_argument_group("Structured pruning and layer-wise allocation")
    g.add_argument("--structure", default=None, choices=STRUCTURES,
                   help="remove whole FFN channels and/or attention heads (magnitude, wanda, sparsegpt become "
                        "their structured versions; structprune defaults to channels); the model is saved smaller")
    g.add_argument("--head-sparsity", type=float, default=None,
                   help="share of query heads removed (with --structure heads or channels+heads; the same number "
                        "from every key/value group, rounded to what that allows)")
    g.add_argument("--allocation", default=a.rule, choices=AllocationSettings.RULES,
                   help="spread of the sparsity over the layers: uniform, owl (unstructured) or energy (softmax "
                        "over per-layer energies); the mean stays --sparsity")
    g.add_argument("--temperature", type=float, default=a.temperature, help="energy allocation's softmax temperature")
    g.add_argument("--owl-lambda", type=float, default=a.owl_lambda, help="OWL: half-range of the layer sparsities")
    g.add_argument("--owl-m", type=float, default=a.owl_m, help="OWL: outlier threshold, times the mean score")
    g.add_argument("--layer-sparsity-min", type=float, default=None,
                   help=f"lowest per-layer sparsity (default: --sparsity - {a.spread})")
    g.add_argument("--layer-sparsity-max", type=float, default=None,
                   help=f"highest per-layer sparsity (default: --sparsity + {a.spread}, at most 0.95)")
    p.add_argument("--layers", type=parse_layers, default=None,
                   help="half-open range START:STOP of decoder layers to prune; START: runs to the last layer "
                        "(default: all)")
    p.add_argument("--no-sequential", dest="sequential", action="store_false",
                   help="gather all of a layer's statistics from the dense layer (as the reference code) "
                        "instead of after pruning the earlier linears of the same layer")
    p.add_argument("--calib", default=d.calib, help="calibration text: wiki (offline default), wikitext2, ptb, "
                   "c4, NAME:PATH for local files of that data set, or a path to a .txt/.jsonl/.json file")
    p.add_argument("--nsamples", type=int, default=d.nsamples, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration windows and of the run")
    p.add_argument("--blocksize", type=int, default=d.blocksize, help="OBS column block (SparseGPT, SparseLLM)")
    p.add_argument("--percdamp", type=float, default=d.percdamp, help="Hessian dampening, share of mean diagonal")
    g = p.add_argument_group("SparseLLM")
    g.add_argument("--alpha", type=float, default=s.alpha, help="weight of the pre-activation terms (z, s)")
    g.add_argument("--beta", type=float, default=s.beta, help="weight of the FFN output term")
    g.add_argument("--gamma", type=float, default=s.gamma, help="weight of the down projection's input term (p)")
    g.add_argument("--iterations", type=int, default=s.iterations,
                   help="alternating iterations of the FFN solver "
                        f"(default: {sparsellm_solver.DEFAULT_ITERATIONS} for sparsellm, "
                        f"{structprune_solver.DEFAULT_ITERATIONS} for structprune; sparsellm's perplexity was lower "
                        "with 4 at 70-90%%, most at 90%%, for a fifth more time: benchmarks/RESULTS.md)")
    g.add_argument("--relaxation", type=float, default=s.relaxation,
                   help="over-relaxation of the FFN solver's auxiliaries z and s, in (0, 2); 1 is the plain "
                        f"alternation (default: {sparsellm_solver.DEFAULT_RELAXATION:g} for sparsellm, "
                        f"{structprune_solver.DEFAULT_RELAXATION:g} for structprune)")
    g.add_argument("--product-precision", default=s.product_precision, choices=PRODUCT_PRECISIONS,
                   help="precision of the FFN solver's large products: tf32 (TF32 on CUDA, float32 on the "
                        "CPU), float32, bfloat16 operands (fastest on CPUs with AMX; FFN errors move slightly), or "
                        "float16 operands scaled into range with float32 results (for CUDA; emulated, slower, on CPUs); "
                        "default: float16 on CUDA (torch 2.8+), tf32 elsewhere")
    g.add_argument("--cpu-gemm", default=s.cpu_gemm, choices=CPU_GEMMS,
                   help="library of the FFN solver's float32 products on the CPU: torch (MKL) or onednn (the same "
                        "float32 arithmetic in another summation order; 1.6-2.2x faster than MKL on AMD CPUs); "
                        "default: onednn for sparsellm where this torch has it, torch for structprune")
    g.add_argument("--chunk-tokens", type=int, default=s.chunk_tokens,
                   help="calibration tokens per chunk of the FFN solver's token-wise steps (default: automatic, "
                        "32 MB temporaries on the CPU, 128 MB on CUDA); memory and speed only")
    e = ElsaSettings()
    g = p.add_argument_group("Elsa and masked-adam (whole-model training on the calibration text)")
    g.add_argument("--steps", type=int, default=e.steps, help="optimiser steps")
    g.add_argument("--batch-size", type=int, default=e.batch_size, help="windows per micro-batch and process")
    g.add_argument("--grad-accum", type=int, default=e.grad_accum, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=e.lr, help="AdamW learning rate")
    g.add_argument("--adam-betas", default=",".join(map(str, e.betas)), help="AdamW betas, as B1,B2")
    g.add_argument("--weight-decay", type=float, default=e.weight_decay, help="AdamW weight decay (on matrices; biases and norm scales are not decayed)")
    g.add_argument("--lr-schedule", default=e.lr_schedule, choices=ElsaSettings.LR_SCHEDULES, help="learning-rate schedule")
    g.add_argument("--max-grad-norm", type=float, default=e.max_grad_norm, help="clipping of the loss gradient")
    g.add_argument("--admm-lambda", type=float, default=e.admm_lambda, help="ADMM penalty (where a ramp heads, reached at step --steps)")
    g.add_argument("--admm-lambda-start", type=float, default=None, help="start of a linear/cosine ramp; None: lambda / 10")
    g.add_argument("--admm-schedule", default=e.admm_schedule, choices=ElsaSettings.ADMM_SCHEDULES,
                   help="ramp of the ADMM penalty from --admm-lambda-start to --admm-lambda")
    g.add_argument("--admm-interval", type=int, default=e.admm_interval, help="steps between z/u updates")
    g.add_argument("--score", default=e.score, choices=ElsaSettings.SCORES,
                   help="projection score: fisher = Adam's v * (w + u)^2, or magnitude |w + u|")
    g.add_argument("--init", default=None, help="start from this layer-wise method's pruned weights (e.g. sparsegpt)")
    g.add_argument("--train-dense-params", action="store_true",
                   help="also train every parameter that is not pruned (embeddings, norms, lm_head, biases, the "
                        "linears of layers outside --layers; frozen by default)")
    g.add_argument("--state-dtype", default=e.state_dtype, choices=ElsaSettings.STATE_DTYPES,
                   help="storage of the ADMM states z and u (bfloat16, float8: the memory-lean Elsa-L)")
    g.add_argument("--optimizer", default=e.optimizer, choices=ElsaSettings.OPTIMIZERS,
                   help="adamw8bit keeps Adam's moments in 8 bits (bitsandbytes: pip install 'sparsellm[adam8bit]')")
    g.add_argument("--train-precision", default=e.train_precision, choices=ElsaSettings.TRAIN_PRECISIONS,
                   help="arithmetic of the training passes: tf32 (TF32 matmuls on CUDA, float32 on the CPU), "
                        "float32, or bfloat16 (autocast; float32 weights and optimizer states)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model for the training passes (fewer kernel launches; the first "
                        "step pays the compile)")
    g.add_argument("--checkpoint-dir", default=None,
                   help="checkpoint here; a run finding a checkpoint of the same settings resumes from it")
    g.add_argument("--checkpoint-every", type=int, default=e.checkpoint_every, help="steps between checkpoints")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients, Adam's moments and the ADMM states (or the mask) "
                        "over the processes with FSDP2 (one included); without torchrun: the ordinary run")
    p.add_argument("--eval", default=",".join(d.eval),
                   help="comma-separated evaluation texts (same names as --calib), or none")
    p.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default: --seqlen)")
    p.add_argument("--eval-windows", type=int, default=None, help="cap on evaluation windows (default: all)")
    p.add_argument("--no-dense-eval", dest="eval_dense", action="store_false", help="skip the dense perplexity")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                   help="model dtype; the pruning math is float32 regardless")
    p.add_argument("--backend", default=d.backend, choices=list(BACKENDS),
                   help="kernels for the hot operations (also SPARSELLM_BACKEND)")
    p.add_argument("--save", default=None, help="write the pruned model (safetensors + tokenizer) to this folder")
    p.add_argument("--save-format", default=d.save_format, choices=SAVE_FORMATS,
                   help="dense safetensors, or compressed (sparse-bitmask; the compressed extra)")
    p.add_argument("--export", default=None, choices=EXPORT_KINDS,
                   help="after pruning, swap eligible weights to sparse kernels before evaluation")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --save folder whole (only a saved model's: it has a config.json)")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log per-layer details")
    return p


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    layers = args.layers
    return PruneConfig(
        model=args.model, method=args.method, sparsity=args.sparsity, layers=layers, sequential=args.sequential,
        calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        blocksize=args.blocksize, percdamp=args.percdamp,
        sparsellm=SparseLLMSettings(alpha=args.alpha, beta=args.beta, gamma=args.gamma, iterations=args.iterations,
                                    relaxation=args.relaxation,
                                    product_precision=args.product_precision, chunk_tokens=args.chunk_tokens,
                                    cpu_gemm=args.cpu_gemm),
        structure=args.structure, head_sparsity=args.head_sparsity,
        allocation=AllocationSettings(rule=args.allocation, temperature=args.temperature, owl_lambda=args.owl_lambda,
                                      owl_m=args.owl_m, min_sparsity=args.layer_sparsity_min,
                                      max_sparsity=args.layer_sparsity_max),
        elsa=ElsaSettings(
            steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
            betas=_floats(args.adam_betas, "--adam-betas"), weight_decay=args.weight_decay,
            lr_schedule=args.lr_schedule, max_grad_norm=args.max_grad_norm, admm_lambda=args.admm_lambda,
            admm_lambda_start=args.admm_lambda_start, admm_schedule=args.admm_schedule,
            admm_interval=args.admm_interval, score=args.score, init=args.init,
            train_dense_params=args.train_dense_params, state_dtype=args.state_dtype, optimizer=args.optimizer,
            train_precision=args.train_precision, compile=args.compile,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, fsdp=args.fsdp),
        eval=tuple(e for e in args.eval.split(",") if e), eval_seqlen=args.eval_seqlen,
        eval_windows=args.eval_windows, eval_dense=args.eval_dense, device=args.device, dtype=args.dtype,
        backend=args.backend, quiet=args.quiet, save=args.save, save_format=args.save_format,
        export=args.export, overwrite=args.overwrite, report=args.report)


def _attach_range_values(argv: list[str]) -> list[str]:
    """``--layers -1:2`` as ``--layers=-1:2``: argparse takes a value that starts with a dash and
    is no plain negative number for an option, and answered "expected one argument" instead of
    the range's own error."""
    out = []
    for arg in argv:
        if out and out[-1] == "--layers" and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"--layers={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_range_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .api import run
    from .distributed import is_main_process
    from .report import summary

    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        config = config_from_args(args)
        report = run(config)
    except KeyboardInterrupt:  # outputs are published only when complete (sparsellm.api.run)
        print("interrupted; no pruned model or report was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, NotImplementedError) as exc:
        print(f"sparsellm-prune: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning
    if not is_main_process():
        return 0  # under torchrun only rank 0 writes, so only it reports what was written
    print(summary(report))
    if config.report:
        print(f"report written to {config.report}")
    if config.save:
        # a plain AutoModelForCausalLM.from_pretrained initialises a compressed save's pruned weights
        # at random and refuses layers of different sizes (README, Sparse export; Physical removal)
        plain = config.save_format != "compressed" and (report.get("structure") or {}).get("plain_checkpoint", True)
        print(f"pruned model saved to {config.save}" + (
            "" if plain else " (not a plain transformers checkpoint: load it with sparsellm.load_pruned)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
