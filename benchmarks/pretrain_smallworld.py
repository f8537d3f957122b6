"""Pretrain the toy world's base model (TAESD VAE, CLIP text model, SD1.5-architecture UNet).

    .venv/bin/python benchmarks/pretrain_smallworld.py [--max-minutes M] [--work-dir DIR]

Seeded and resumable: stop it any time (Ctrl-C or ``--max-minutes``) and run the same command again
to continue from the last checkpoint in ``--work-dir``. When every stage is done it writes fp16
weights to ``smallworld/weights/`` and prints the base-model quality gate. ``--export-now`` writes
the current EMA weights without finishing (for inspection; the shipped files come from a full run).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))
from devkit import bench  # noqa: E402
from devkit.pack import REPO_ROOT  # noqa: E402


def unit_rate(text: str) -> float:
    """A share in [0, 1] (an argparse type)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".smallworld_pretrain")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "smallworld" / "weights")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    bench.add_machine_arguments(parser, device="cpu")
    parser.add_argument("--steps", type=int, default=None, help="UNet steps (default: config)")
    parser.add_argument("--more-steps", type=int, default=None,
                        help="UNet steps: this many more than the work directory's UNet stage has done")
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--scenes", type=int, default=None)
    parser.add_argument("--decoder-only", action="store_true",
                        help="run only the decoder fine-tuning stage (it may run beside the UNet stage)")
    parser.add_argument("--export-now", action="store_true", help="export the current EMA weights and exit")
    parser.add_argument("--export-when-stopped", action="store_true",
                        help="also export (and gate) when the UNet stage stops before --steps")
    parser.add_argument("--two-object-samples", type=int, default=0, help="seeds per two-object gate prompt")
    parser.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR loss weight (0: plain MSE)")
    parser.add_argument("--lr", type=float, default=None, help="UNet/text learning rate")
    parser.add_argument("--gate-samples", type=int, default=2, help="seeds per gate prompt (0: no gate)")
    parser.add_argument("--batch", type=int, default=None, help="UNet batch size (default: config)")
    parser.add_argument("--decoder-steps", type=int, default=None, help="decoder fine-tuning steps")
    parser.add_argument("--decoder-batch", type=int, default=None)
    parser.add_argument("--gates", type=Path, default=None, metavar="DIR",
                        help="print the gates of the weights in DIR (with --gate-samples and "
                             "--two-object-samples) and exit, training nothing")
    parser.add_argument("--slim-copy", type=Path, default=None, metavar="DIR",
                        help="copy --work-dir to DIR without optimizer states or latents, and exit")
    parser.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                        help="start an empty --work-dir from these weights: VAE done, UNet widened, text kept")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--text-lr-scale", type=float, default=None, help="text model lr relative to --lr")
    parser.add_argument("--supervision-weight", type=float, default=None, help="attention supervision (0: off)")
    parser.add_argument("--supervision-max-t", type=float, default=None, help="supervise noise levels t <= this")
    parser.add_argument("--supervision-layers", default=None, help="layers whose word maps are supervised")
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--twin-rate", type=unit_rate, default=None,
                        help="share of multi-object scenes replaced by twins: objects of one colour and pattern "
                             "that only shape (or position) words tell apart. It shapes only scenes not yet in "
                             "the work dir's latent cache: with --scenes above the cached count it appends them")
    parser.add_argument("--hidden-hint-rate", type=unit_rate, default=None,
                        help="share of a hidden object's caption mentions that name one of its two words "
                             "(colour or pattern, never both), before dropped words and empty captions; "
                             "captions are drawn per step, so it acts from the step it is given on, and a "
                             "resumed run without it names none")
    parser.add_argument("--hidden-word-samples", type=int, default=0,
                        help="seeds per prompt of the hidden-words diagnostic printed with the gates (0: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    device = bench.start_benchmark(args, attention="pytorch")  # SDPA: ~2x faster than sub-quadratic on CPU
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True  # GPU only; a tiny model gains nothing from full fp32
    from smallworld_lab import pretrain, quality

    if args.slim_copy:
        pretrain.slim_checkpoint(args.work_dir, args.slim_copy)
        return 0
    if args.gates:
        print_gates(args.gates, args)
        return 0
    cfg = pretrain.PretrainConfig(work_dir=args.work_dir)
    for name in ("steps", "vae_steps", "scenes", "snr_gamma", "lr", "batch", "decoder_steps", "decoder_batch",
                 "warmup", "text_lr_scale", "supervision_weight", "supervision_max_t", "supervision_layers",
                 "checkpoint_every", "twin_rate", "hidden_hint_rate"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    if args.init_from is not None and pretrain.seed_from_weights(cfg, args.init_from):
        logging.info("seeded %s from %s", cfg.work_dir, args.init_from)
    if args.more_steps is not None:
        cfg.steps = pretrain.unet_steps_done(cfg.work_dir) + args.more_steps
        logging.info("UNet stage runs to step %d", cfg.steps)
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    signal.signal(signal.SIGTERM, lambda *_: interrupted.append(True))

    def should_stop() -> bool:
        return bool(interrupted) or (deadline is not None and time.monotonic() > deadline)

    taesd = pretrain.train_vae(cfg, should_stop)
    data = pretrain.encode_latents(cfg, taesd, should_stop, device) if not should_stop() else None
    if data is None:
        logging.info("stopped during the VAE/latent stages; run again to resume")
        return 0
    if args.export_now:  # snapshot of whatever is done: no further training
        interrupted.append(True)
    decoder_step = pretrain.train_decoder(cfg, taesd, data, should_stop, device)
    if args.decoder_only or (decoder_step < cfg.decoder_steps and not args.export_now):
        logging.info("decoder at step %d/%d%s", decoder_step, cfg.decoder_steps,
                     "" if decoder_step >= cfg.decoder_steps else "; run again to resume")
        return 0
    patcher, clip, step = pretrain.train_unet(cfg, data, should_stop, device)
    if step < cfg.steps and not (args.export_now or args.export_when_stopped):
        logging.info("stopped at UNet step %d/%d; run again to resume", step, cfg.steps)
        return 0
    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "work_dir"}
    info["unet_steps_done"] = step
    pretrain.export_weights(patcher, clip, taesd, args.out_dir, info)
    logging.info("wrote weights to %s", args.out_dir)
    print_gates(args.out_dir, args)
    return 0


def print_gates(weights_dir: Path, args: argparse.Namespace) -> None:
    """The base-model gates of ``weights_dir`` and the pattern-adherence and hidden-words diagnostics, as tables."""
    from smallworld_lab import quality

    if args.gate_samples:
        print(quality.roundtrip_report(weights_dir).table())
        print(quality.quality_gate(weights_dir, seeds=args.gate_samples).table())
        print(quality.pattern_adherence(weights_dir, seeds=args.gate_samples).table())
    if args.two_object_samples:
        print(quality.two_object_gate(weights_dir, seeds=args.two_object_samples).table())
    if args.hidden_word_samples:
        print(quality.hidden_words(weights_dir, seeds=args.hidden_word_samples).table())


if __name__ == "__main__":
    sys.exit(main())
