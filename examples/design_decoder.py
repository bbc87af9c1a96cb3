"""Design decomposition, stage 3 (Module 7): a conditional DDPM decoder from metadata to the RGB design.

System: design decomposition. The decoder (examples/design/diffusion.py) is a blockyard UNet that
predicts the noise of a design image at a DDPM timestep (T = 1000, linear betas 1e-4..0.02),
conditioned on the timestep by FiLM and on the design's metadata by cross-attention to three
tokens (goal, format and tone embeddings; --meta additive: the seed's path, the metadata
embedding added to the timestep vector). Each field is replaced by its own null token with
probability --field-drop, all three at once with --cond-drop, so one network is also the
unconditional model of classifier-free guidance. The U-Net's output is read as the velocity v
and turned into the noise estimate (--prediction v; design/diffusion.py: with the seed's epsilon
output a small error at large t is multiplied by ~60 in the clean-sample estimate, and 600 CPU
steps sampled clipped noise); the loss is the noise MSE (--loss epsilon), AdamW, and an EMA of
the weights samples.

Evaluation: one DDIM sample (--sample-steps, eta 0) per held-out design's metadata, at each
guidance scale of --scales, judged by the frozen stage-1 encoder and stage-2 abstractor
(--encoder, --abstractor: their run folders):

- conditioning fidelity: the abstractor's goal and format accuracy (and tone MAE) on the
  encoder's F of the samples, against their conditioning metadata; against chance, the Bayes
  ceiling, and the same critics on the real held-out designs the metadata came from;
- a Frechet encoder distance (FID's formula in the encoder's feature space: its U-Net levels
  averaged over the map; no Inception weights) to those real designs, against real-vs-real
  (other held-out designs, the floor), and per format against a shuffled-conditioning baseline
  (the same samples grouped by shuffled formats);
- the grammar scores of the samples (formulas on the image and the encoder's F) against the
  real designs'; sample grids per format (samples_<format>.png: real designs of that format
  on the first row, then one row per guidance scale from the same metadata).

    python examples/design_encoder.py && python examples/design_abstractor.py     # stages 1 and 2
    python examples/design_decoder.py                          # 64 px, widths 16,32,64,128
    python examples/design_decoder.py --meta additive --out runs/design/decoder-additive
    torchrun --standalone --nproc_per_node=2 examples/design_decoder.py --resume auto
    python examples/design_decoder.py --seed-scale             # 256 px, the seed's widths (a GPU)

Defaults: 20,000 designs at 64 px (data in OUT/../data, built on first use), --steps 2500 of a
global batch of 32, AdamW --lr 1e-3 warmup-cosine, bf16 autocast (the CPU's AMX; the loss in
fp32), EMA 0.999, 128 evaluation samples, 20 DDIM steps, scales 1,2,4. --smoke: 300 designs,
widths 8,16, 60 steps. --seed-scale: 256 px, widths 64,128,256,512 with 2 blocks per level and
bottleneck self-attention (the seed's decoder), 100,000 steps.

Writes to --out: run.json, model.json and decoder/ (the EMA weights: design/diffusion.py's
load_decoder), checkpoints/, metrics.jsonl, summary.json, samples_<format>.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from design.ceiling import bayes_ceiling
from design.diffusion import DECODER_DIR, DECODER_KIND, META_MODES, PREDICTIONS, DesignDenoiser
from design.frechet import frechet_distance
from design.models import MODEL_FILE, load_abstractor, load_encoder
from design.sampling import Conditions, Judge, fidelity, frechet_by_format, generate, save_grid, start_noise
from design.stage import add_data_args, data_dir, open_data
from design.vocab import FORMATS

from blockyard.blocks import DDPMScheduler, count_parameters
from blockyard.data import rank_batches
from blockyard.train import (
    EMA,
    Dashboard,
    RunDir,
    Stepper,
    add_common_args,
    all_reduce_mean,
    autocast,
    kill_point,
    main_print,
    per_rank_batch,
    predict_rows,
    run_config,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    warmup_cosine,
    wrap_ddp,
)

#: flag -> (CPU default, --smoke, --seed-scale)
SIZES = {"designs": (20_000, 300, 10_000), "size": (64, 64, 256), "steps": (2500, 60, 100_000),
         "batch_size": (32, 8, 32), "widths": ((16, 32, 64, 128), (8, 16), (64, 128, 256, 512)),
         "meta_dim": (64, 16, 256), "blocks_per_level": (1, 1, 2), "attention": (0, 0, 1),
         "eval_samples": (128, 16, 2000), "val_samples": (128, 16, 512), "log_every": (50, 5, 1000),
         "ckpt_every": (100, 10, 5000)}
LOSSES = ("epsilon", "v")
#: paths and report sizes: not part of what the run trains, free to change on resume
IGNORE = ("data", "workers", "encoder", "abstractor", "grid")


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/design/decoder", lr=1e-3, precision="bf16")
    add_data_args(p)
    p.add_argument("--encoder", default=None, help="finished stage-1 run folder (default OUT/../encoder)")
    p.add_argument("--abstractor", default=None, help="finished stage-2 run folder (default OUT/../abstractor)")
    g = p.add_argument_group("denoiser")
    g.add_argument("--widths", type=ints, default=None, help="U-Net widths, finest first (default 16,32,64,128)")
    g.add_argument("--blocks-per-level", type=int, default=None, help="residual blocks per level (default 1)")
    g.add_argument("--meta", default="cross_attention", choices=META_MODES,
                   help="how the metadata enters: cross-attention to 3 tokens, or added to the timestep vector")
    g.add_argument("--meta-dim", type=int, default=None, help="size of each metadata token (default 64)")
    g.add_argument("--attention", type=int, default=None, choices=[0, 1],
                   help="1: self-attention at the bottleneck (default 0; the seed's decoder had it)")
    g.add_argument("--prediction", default="v", choices=PREDICTIONS,
                   help="what the U-Net predicts (the denoiser returns the noise either way); see design/diffusion.py")
    g.add_argument("--heads", type=int, default=4, help="cross-attention heads")
    g.add_argument("--context-levels", type=int, default=2, help="lowest resolutions with cross-attention")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2500)")
    g.add_argument("--loss", default="epsilon", choices=LOSSES,
                   help="epsilon: MSE of the noise estimate; v: the same error on v (epsilon MSE / alphas_cumprod[t])")
    g.add_argument("--cond-drop", type=float, default=0.1, help="probability of dropping all three fields")
    g.add_argument("--field-drop", type=float, default=0.1, help="probability of dropping each field alone")
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup", type=float, default=0.05, help="warmup steps as a fraction of --steps")
    g.add_argument("--log-every", type=int, default=None, help="steps between metrics records (default 50)")
    g.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints, a multiple of "
                                                                "--log-every (default 100)")
    g.add_argument("--val-samples", type=int, default=None, help="held-out designs of the validation loss")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-samples", type=int, default=None, help="generated designs per scale (default 128)")
    g.add_argument("--sample-steps", type=int, default=20, help="DDIM steps")
    g.add_argument("--scales", type=floats, default=(1.0, 2.0, 4.0), help="guidance scales (default 1,2,4)")
    g.add_argument("--grid", type=int, default=8, help="designs per row of the sample grids")
    p.add_argument("--seed-scale", action="store_true", help="the seed's 256 px and widths (see the defaults)")
    args = p.parse_args(argv)
    column = 1 if args.smoke else 2 if args.seed_scale else 0
    for key, values in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, values[column])
    if args.ckpt_every % args.log_every:
        p.error(f"--ckpt-every: expected a multiple of --log-every {args.log_every}, got {args.ckpt_every}")
    out = Path(args.out).resolve().parent
    args.encoder = args.encoder or str(out / "encoder")
    args.abstractor = args.abstractor or str(out / "abstractor")
    return args


def step_generator(seed: int, step: int, rank: int, world: int) -> torch.Generator:
    """The noise, timesteps and condition drops of one step: a function of (seed, step, rank) only, so a
    resumed run draws what an uninterrupted one would have."""
    return torch.Generator().manual_seed((seed * 10_000_000 + step) * world + rank)


def noised(x0: torch.Tensor, scheduler: DDPMScheduler, g: torch.Generator, cond_drop: float, field_drop: float):
    """``(x_t, t, noise, drop)`` for a batch of clean designs ``x0`` in [-1, 1]."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, scheduler.num_steps, (b,), generator=g)
    drop = (torch.rand(b, 1, generator=g) < cond_drop) | (torch.rand(b, 3, generator=g) < field_drop)
    return scheduler.add_noise(x0, noise, t), t, noise, drop


def diffusion_loss(eps: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler: DDPMScheduler,
                   kind: str = "epsilon") -> torch.Tensor:
    """Mean over the batch of the per-sample noise MSE, weighted by ``1 / alphas_cumprod[t]`` for ``kind="v"``
    (the velocity's MSE: v - v_hat = (eps - eps_hat) / sqrt(ac) at a fixed x_t)."""
    per_sample = (eps.float() - noise.float()).square().mean(dim=(1, 2, 3))
    if kind == "v":
        per_sample = per_sample / scheduler.alphas_cumprod.to(per_sample.device)[t]
    return per_sample.mean()


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    per_rank = per_rank_batch(args.batch_size, info.world_size)
    run = RunDir(args.out, run_config(args, ignore=IGNORE), resume=args.resume, overwrite=args.overwrite)
    device, say = info.device, main_print(info.is_main)
    seed_everything(args.seed)
    t_start, cpu_start = time.perf_counter(), time.process_time()  # CPU: this process, all threads

    # --- data and the critics of the earlier stages ----------------------------------------------
    splits = open_data(data_dir(args.data, args.out, args.smoke, args.size), args.designs, args.size, args.data_seed,
                       args.workers, info.is_main)
    train, val, test = splits.train, splits.val, splits.test
    images = train.store.column("image")  # uint8, about 200 MB at 64 px
    meta = Conditions(train.store.column("goal"), train.store.column("format"), train.store.column("tone"))
    judge = Judge(load_encoder(args.encoder, device), load_abstractor(args.abstractor, device))
    say(f"designs: train {len(train)}, val {len(val)}, test {len(test)}; critics from {args.encoder} and "
        f"{args.abstractor}; world {info.world_size} on {device}, {args.precision}")

    # --- model -----------------------------------------------------------------------------------
    kwargs = {"widths": list(args.widths), "meta": args.meta, "meta_dim": args.meta_dim, "heads": args.heads,
              "context_levels": args.context_levels, "blocks_per_level": args.blocks_per_level,
              "attention": bool(args.attention), "prediction": args.prediction}
    model = DesignDenoiser(**kwargs).to(device)
    run.write_json(MODEL_FILE, {"kind": DECODER_KIND, "kwargs": kwargs})
    scheduler = DDPMScheduler().to(device)  # T = 1000, linear betas 1e-4 .. 0.02, x0 clipped to [-1, 1]
    say(f"decoder: UNet widths {args.widths}, metadata by {args.meta}, {count_parameters(model):,} parameters")

    # --- train -----------------------------------------------------------------------------------
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size: {args.batch_size} is larger than the training split ({len(train)} designs)")
    total, warmup = args.steps, min(int(args.warmup * args.steps), args.steps - 1)
    ddp = wrap_ddp(model, info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = lambda s: warmup_cosine(s, total, warmup, args.lr, min_lr=0.01 * args.lr)  # noqa: E731
    ema = EMA(model, decay=args.ema_decay)
    stepper = Stepper(ddp, optimizer, precision=args.precision, clip_value=1.0, schedule=schedule, ema=ema)
    state = {"model": model, "optimizer": optimizer, "stepper": stepper, "ema": ema}
    ckpt = run.checkpoints("checkpoints", keep_last=1)
    resumed = run.resume_from(ckpt, state)
    start = resumed["step"] if resumed else 0  # batches done (= optimizer steps unless a step was skipped)
    log = run.metrics_log("metrics.jsonl", resumed, key="step")
    noiser = DDPMScheduler()  # on the CPU: the training noise is drawn there, from a per-step generator
    nv = min(args.val_samples, len(val))
    val_batch = val.get_batch(range(nv))
    val_cond = Conditions(val_batch.goal, val_batch.format, val_batch.tone)
    val_noise = torch.randn(val_batch.image.shape, generator=torch.Generator().manual_seed(7))
    val_t = ((torch.arange(nv) + 0.5) * noiser.num_steps / nv).long()  # stratified over the timesteps
    val_x0 = val_batch.image * 2 - 1
    val_xt = noiser.add_noise(val_x0, val_noise, val_t)

    def val_loss(net) -> list[float]:
        """Noise MSE and clean-estimate MSE (in [-1, 1]) of ``net`` on the fixed validation (x_t, t)."""
        def rows_fn(rows):
            rows = rows.cpu()
            c = val_cond.rows(rows).to(device)
            x_t, t = val_xt[rows].to(device), val_t[rows].to(device)
            with autocast(device, args.precision):
                eps = net(x_t, t, c.goal, c.format, c.tone).float()
            x0 = scheduler.ddim_step(eps, t, torch.full_like(t, -1), x_t).pred_original_sample
            return torch.stack([(eps - val_noise[rows].to(device)).square().mean(dim=(1, 2, 3)),
                                (x0 - val_x0[rows].to(device)).square().mean(dim=(1, 2, 3))], dim=1)
        return predict_rows(rows_fn, nv, batch_size=64, device=device).mean(dim=0).tolist()

    # what a denoiser that learned nothing scores: the U-Net's output F = 0 (v: eps = sqrt(1 - ac) x_t; epsilon: 0)
    blank = DesignDenoiser(**kwargs).to(device)
    blank.unet.head.weight.data.zero_()
    blank.unet.head.bias.data.zero_()
    val_blank = val_loss(blank)
    del blank
    say(f"a blank denoiser (U-Net output 0) on the validation set: noise MSE {val_blank[0]:.4f}, clean-estimate MSE "
        f"{val_blank[1]:.4f}")

    dash = Dashboard(total, every_s=15, is_main=info.is_main, desc="decoder ")
    if resumed:
        dash.write(f"resumed from {resumed['path']} (step {start})")
    t0, loss_sum, count, order_epoch = time.perf_counter(), torch.zeros((), dtype=torch.float64), 0, -1
    ddp.train()
    for it in range(start, total):
        epoch, i = divmod(it, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = rank_batches(len(train), per_rank, epoch, args.seed, info.rank, info.world_size), epoch
        rows = order[i]
        x0 = images[rows].float() / 127.5 - 1.0
        c = meta.rows(rows)
        x_t, t, noise, drop = noised(x0, noiser, step_generator(args.seed, it, info.rank, info.world_size),
                                     args.cond_drop, args.field_drop)
        with stepper.micro_batch(0) as mb:
            with autocast(device, args.precision):
                eps = ddp(x_t.to(device), t.to(device), c.goal.to(device), c.format.to(device), c.tone.to(device),
                          drop.to(device))
            loss = diffusion_loss(eps, noise.to(device), t.to(device), scheduler, args.loss)
            stepper.backward(loss)
        if mb.step and stepper.step():
            kill_point(args.kill_at_step, stepper.steps)
        loss_sum += loss.detach().double().cpu()
        count += 1
        dash.update(it + 1, loss=loss.detach())
        if (it + 1) % args.log_every == 0 or it + 1 == total:
            val_eps, val_x0_mse = val_loss(ema.module)
            record = {"opt_step": stepper.steps, "lr": schedule(stepper.steps - 1),
                      f"train_{args.loss}_loss": float(all_reduce_mean(loss_sum.to(device) / count)),
                      "val_eps_mse_ema": val_eps, "val_x0_mse_ema": val_x0_mse, "time_s": time.perf_counter() - t0}
            ddp.train()
            log.log(it + 1, **record)  # before the checkpoint: a resumed log equals an uninterrupted one
            dash.write(f"step {it + 1}/{total}: train {args.loss} loss {record[f'train_{args.loss}_loss']:.4f}, "
                       f"val (EMA) noise MSE {val_eps:.4f}, clean-estimate MSE {val_x0_mse:.4f}")
            loss_sum, count = torch.zeros((), dtype=torch.float64), 0
            if (it + 1) % args.ckpt_every == 0 or it + 1 == total:
                ckpt.save(it + 1, state)
    dash.close()
    records = log.read() if info.is_main else []
    log.close()
    decoder = ema.module.eval()
    run.checkpoints(DECODER_DIR, keep_last=1).save(total, {"model": decoder})
    train_time = time.perf_counter() - t0

    # --- evaluate: samples from held-out metadata, judged by the frozen critics -------------------
    n = min(args.eval_samples, len(val), len(test))
    real = val.get_batch(range(n))
    cond = Conditions(real.goal, real.format, real.tone)
    bs = max(8, 64 // info.world_size)
    judged_real = judge.judge(real.image, bs, device)
    other = test.get_batch(range(n))
    judged_other = judge.judge(other.image, bs, device)
    noise = start_noise(n, args.size, args.seed + 1)
    shuffled = cond.format[torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 2))]
    results = {"real held-out": {**fidelity(judged_real, cond),
                                 "frechet": frechet_distance(judged_other.features, judged_real.features),
                                 "frechet_by_format": frechet_by_format(judged_other.features, other.format,
                                                                        judged_real.features, cond.format)}}
    grids = {f: [real.image[cond.format == f][:args.grid]] for f in range(len(FORMATS))}
    t_eval = time.perf_counter()
    for scale in args.scales:
        samples = generate(decoder, scheduler, noise, cond, scale=scale, steps=args.sample_steps, batch_size=bs,
                           device=device, precision=args.precision)
        judged = judge.judge(samples, bs, device)
        results[f"samples s={scale:g}"] = {
            **fidelity(judged, cond), "frechet": frechet_distance(judged.features, judged_real.features),
            "frechet_by_format": frechet_by_format(judged.features, cond.format, judged_real.features, cond.format),
            "frechet_by_format_shuffled": frechet_by_format(judged.features, shuffled, judged_real.features,
                                                            cond.format)}
        for f in grids:
            grids[f].append(samples[cond.format == f][:args.grid])
    eval_time = time.perf_counter() - t_eval

    # --- report ----------------------------------------------------------------------------------
    if info.is_main:
        table = report_table(results, n, args.sample_steps)
        print("\n" + table)
        plots = [Path(save_grid(run.file(f"samples_{FORMATS[f]}.png"), rows)).name for f, rows in grids.items()
                 if rows[0].shape[0]]
        summary = {"world_size": info.world_size, "device": str(device), "model": kwargs,
                   "parameters": count_parameters(model), "designs": {"train": len(train), "val": len(val),
                                                                      "test": len(test)},
                   "optimizer_steps": stepper.steps, "records": len(records),
                   "val_eps_mse_ema": records[-1]["val_eps_mse_ema"] if records else None,
                   "val_x0_mse_ema": records[-1]["val_x0_mse_ema"] if records else None,
                   "val_blank": {"eps_mse": val_blank[0], "x0_mse": val_blank[1]},
                   "eval_samples": n, "sample_steps": args.sample_steps, "results": results,
                   "ceiling": bayes_ceiling()._asdict(), "table": table, "plots": plots,
                   "train_time_s": train_time, "eval_time_s": eval_time, "wall_time_s": time.perf_counter() - t_start,
                   "cpu_time_s": time.process_time() - cpu_start}
        print(f"\nwrote {run.write_json('summary.json', summary)}")
    run.finish()
    teardown_distributed()


def report_table(results: dict[str, dict], n: int, steps: int) -> str:
    """Conditioning fidelity, grammar and Frechet encoder distance of every row of ``results``."""
    c = bayes_ceiling()
    lines = [f"decoder samples: {n} held-out designs' metadata, DDIM {steps} steps; critics: stage-2 abstractor on "
             "the stage-1 encoder's F",
             f"{'':<22}{'goal acc':>9}{'format acc':>11}{'tone MAE':>9}{'grammar':>9}{'FED':>9}{'FED/format':>11}"
             f"{'shuffled':>9}", "-" * 89,
             f"{'chance':<22}{c.goal_chance:>9.3f}{c.format_chance:>11.3f}",
             f"{'Bayes ceiling':<22}{c.goal_accuracy:>9.3f}{c.format_accuracy:>11.3f}"]
    for name, r in results.items():
        label = "real held-out (floor)" if name == "real held-out" else name
        shuffled = f"{r['frechet_by_format_shuffled']:>9.3f}" if "frechet_by_format_shuffled" in r else ""
        lines.append(f"{label:<22}{r['goal_accuracy']:>9.3f}{r['format_accuracy']:>11.3f}{r['tone_mae']:>9.3f}"
                     f"{r['grammar_mean']:>9.3f}{r['frechet']:>9.3f}{r['frechet_by_format']:>11.3f}{shuffled}")
    lines.append("FED: Frechet encoder distance (squared) to the real designs whose metadata conditioned the samples "
                 "(floor: other real held-out designs); FED/format: its mean over formats; shuffled: the same "
                 "samples grouped by shuffled formats. grammar: mean of the 4 formula scores.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
