"""Design decomposition, stage 4 (Module 8): reward fine-tuning of the decoder on the grammar scores.

System: design decomposition. The stage-3 decoder (--decoder: its run folder) is fine-tuned with
the stage-1 encoder and stage-2 abstractor frozen, on

    L = eps-MSE(real designs) - lambda * mean of the 4 grammar scores of x0_hat

where x0_hat is a differentiable clean-sample estimate of the decoder's own sample: the DDIM
chain (--sample-steps, eta 0) runs without gradients from fresh noise down to a late step t, drawn
each step among the chain's timesteps in [--reward-t-min, --reward-t-max], and x0_hat is the
one-step estimate from x_t with gradients (ReFL: Xu et al., "ImageReward", NeurIPS 2023). The
reward is the grammar formulas on x0_hat and the frozen encoder's soft F (sigmoid masks, softmax
colour; design/reward.py says why the formulas and not the abstractor's grammar head). The
epsilon loss on real designs keeps the decoder a model of the data.

Evaluation on held-out metadata, the same start noise before and after:

- the mean grammar score (formulas on the encoder's hard F) of the un-tuned and the tuned
  decoder's samples, with the abstractor's grammar estimate as a second opinion;
- the Frechet encoder distance to the real designs before and after (no collapse), and the
  conditioning fidelity (abstractor accuracy) before and after;
- best-of-N from the un-tuned decoder (per condition the best of N samples by the same measured
  score) for N = 1, 2, 4, ... and at equal sampler evaluations: N = 1 + (denoiser evaluations of
  the fine-tuning) / (evaluations of one sample per held-out condition), rounded down.

    python examples/design_reward.py                  # after design_decoder.py (runs/design/decoder)
    python examples/design_reward.py --reward-weight 3 --out runs/design/reward-l3
    torchrun --standalone --nproc_per_node=2 examples/design_reward.py --resume auto

Defaults: 150 steps, each an epsilon batch of 16 real designs and a reward batch of 8 samples,
AdamW --lr 5e-5, --reward-weight 0.3, bf16 autocast, 10 DDIM steps, 96 evaluation conditions.
lambda 0.3 was chosen by a sweep on a 3000-step decoder (grammar 0.601 un-tuned, same noise):
lambda 1 reached 0.700 with the Frechet encoder distance up from 0.73 to 10.1 (collapse to one
design), 0.3 reached 0.703 at 2.85, 0.1 reached 0.655 at 2.15.
--smoke: 6 steps, batches 4 and 4, 8 conditions.

Writes to --out: run.json, model.json and decoder/ (the tuned weights: design/diffusion.py's
load_decoder), checkpoints/, metrics.jsonl, summary.json, reward_samples.png (real designs, the
un-tuned and the tuned decoder's samples from the same noise, one row each).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from design.diffusion import DECODER_DIR, DECODER_KIND, ddim_chain, load_decoder
from design.frechet import frechet_distance
from design.models import MODEL_FILE, load_abstractor, load_encoder
from design.reward import REWARD_SOURCES, clean_estimate, grammar_reward
from design.sampling import Conditions, Judge, best_of_n, fidelity, generate, save_grid, start_noise
from design.stage import add_data_args, data_dir, open_data
from design_decoder import noised, step_generator

from blockyard.blocks import DDPMScheduler, count_parameters
from blockyard.train import (
    Dashboard,
    RunDir,
    Stepper,
    add_common_args,
    all_reduce_mean,
    autocast,
    kill_point,
    main_print,
    per_rank_batch,
    run_config,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    wrap_ddp,
)

#: flag -> (CPU default, --smoke, --seed-scale)
SIZES = {"designs": (20_000, 300, 10_000), "size": (64, 64, 256), "steps": (150, 6, 2000),
         "batch_size": (16, 4, 16), "reward_batch": (8, 4, 8), "eval_samples": (96, 8, 500),
         "log_every": (10, 2, 100), "ckpt_every": (50, 2, 500)}
IGNORE = ("data", "workers", "encoder", "abstractor", "decoder", "grid")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/design/reward", lr=5e-5, precision="bf16")
    add_data_args(p)
    p.add_argument("--decoder", default=None, help="finished stage-3 run folder (default OUT/../decoder)")
    p.add_argument("--encoder", default=None, help="finished stage-1 run folder (default OUT/../encoder)")
    p.add_argument("--abstractor", default=None, help="finished stage-2 run folder (default OUT/../abstractor)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default 150)")
    g.add_argument("--reward-batch", type=int, default=None, help="global reward samples per step (default 8)")
    g.add_argument("--reward-weight", type=float, default=0.3, help="lambda of the grammar reward")
    g.add_argument("--reward-source", default="formula", choices=REWARD_SOURCES,
                   help="formula: grammar_scores on the encoder's soft F; abstractor: its grammar head")
    g.add_argument("--reward-t-min", type=int, default=100, help="lowest timestep of the one-step estimate")
    g.add_argument("--reward-t-max", type=int, default=400, help="highest timestep of the one-step estimate")
    g.add_argument("--cond-drop", type=float, default=0.1, help="as in stage 3, on the epsilon batch")
    g.add_argument("--field-drop", type=float, default=0.1, help="as in stage 3, on the epsilon batch")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--log-every", type=int, default=None, help="steps between metrics records (default 10)")
    g.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default 50)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-samples", type=int, default=None, help="held-out conditions (default 96)")
    g.add_argument("--sample-steps", type=int, default=10, help="DDIM steps, of the reward chain and the samples")
    g.add_argument("--scale", type=float, default=1.0, help="guidance scale of the samples")
    g.add_argument("--max-best-of", type=int, default=8, help="best-of-N also for N = 1, 2, 4, ... up to this")
    g.add_argument("--grid", type=int, default=8, help="designs in reward_samples.png")
    p.add_argument("--seed-scale", action="store_true", help="256 px sizes (with a stage 3 trained at 256 px)")
    args = p.parse_args(argv)
    column = 1 if args.smoke else 2 if args.seed_scale else 0
    for key, values in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, values[column])
    if args.ckpt_every % args.log_every:
        p.error(f"--ckpt-every: expected a multiple of --log-every {args.log_every}, got {args.ckpt_every}")
    out = Path(args.out).resolve().parent
    for name in ("decoder", "encoder", "abstractor"):
        setattr(args, name, getattr(args, name) or str(out / name))
    return args


def reward_stops(scheduler: DDPMScheduler, steps: int, t_min: int, t_max: int) -> list[int]:
    """Indices ``k`` of the DDIM chain whose timestep lies in ``[t_min, t_max]``: x0 is estimated from x_{t_k}."""
    stops = [k for k, t in enumerate(scheduler.ddim_timesteps(steps)) if t_min <= t <= t_max]
    if not stops:
        raise ValueError(f"--reward-t-min/--reward-t-max: no timestep of the {steps}-step chain "
                         f"{scheduler.ddim_timesteps(steps)} lies in [{t_min}, {t_max}]")
    return stops


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    per_rank = per_rank_batch(args.batch_size, info.world_size)
    reward_per_rank = per_rank_batch(args.reward_batch, info.world_size)
    run = RunDir(args.out, run_config(args, ignore=IGNORE), resume=args.resume, overwrite=args.overwrite)
    device, say = info.device, main_print(info.is_main)
    seed_everything(args.seed)
    t_start, cpu_start = time.perf_counter(), time.process_time()  # CPU: this process, all threads

    # --- data, the frozen critics, the decoder to tune -------------------------------------------
    splits = open_data(data_dir(args.data, args.out, args.smoke, args.size), args.designs, args.size, args.data_seed,
                       args.workers, info.is_main)
    train, val = splits.train, splits.val
    images = train.store.column("image")
    meta = Conditions(train.store.column("goal"), train.store.column("format"), train.store.column("tone"))
    encoder, abstractor = load_encoder(args.encoder, device), load_abstractor(args.abstractor, device)
    judge = Judge(encoder, abstractor)  # eval mode, requires_grad off: the reward's gradient stops at the image
    untuned = load_decoder(args.decoder, device).requires_grad_(False)
    model = load_decoder(args.decoder, device).train().requires_grad_(True)
    kwargs = json.loads((Path(args.decoder) / MODEL_FILE).read_text())["kwargs"]
    run.write_json(MODEL_FILE, {"kind": DECODER_KIND, "kwargs": kwargs})
    scheduler, noiser = DDPMScheduler().to(device), DDPMScheduler()
    stops = reward_stops(scheduler, args.sample_steps, args.reward_t_min, args.reward_t_max)
    timesteps = scheduler.ddim_timesteps(args.sample_steps)
    say(f"decoder from {args.decoder} ({count_parameters(model):,} parameters); reward: {args.reward_source} x "
        f"{args.reward_weight} at t in {[timesteps[k] for k in stops]} of a {args.sample_steps}-step chain; "
        f"world {info.world_size} on {device}, {args.precision}")

    # --- fine-tune -------------------------------------------------------------------------------
    ddp = wrap_ddp(model, info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    stepper = Stepper(ddp, optimizer, precision=args.precision, clip_value=1.0)
    evals = {"evals": 0}  # denoiser evaluations (per image) of the fine-tuning, all ranks
    state = {"model": model, "optimizer": optimizer, "stepper": stepper}
    ckpt = run.checkpoints("checkpoints", keep_last=1)
    resumed = run.resume_from(ckpt, state)
    start = resumed["step"] if resumed else 0
    if resumed:
        evals["evals"] = resumed["evals"]
    log = run.metrics_log("metrics.jsonl", resumed, key="step")
    dash = Dashboard(args.steps, every_s=15, is_main=info.is_main, desc="reward ")
    t0, sums, count = time.perf_counter(), torch.zeros(2, dtype=torch.float64), 0
    for it in range(start, args.steps):
        g = step_generator(args.seed, it, info.rank, info.world_size)
        rows = torch.randint(0, len(train), (per_rank,), generator=g)
        x_t, t, noise, drop = noised(images[rows].float() / 127.5 - 1.0, noiser, g, args.cond_drop, args.field_drop)
        c = meta.rows(torch.randint(0, len(train), (reward_per_rank,), generator=g)).to(device)
        x_T = torch.randn(reward_per_rank, *x_t.shape[1:], generator=g).to(device)
        stop = stops[int(torch.randint(len(stops), (1,), generator=torch.Generator().manual_seed(args.seed + it)))]
        with torch.no_grad(), autocast(device, args.precision):  # the decoder's own sample, down to t_stop
            x_k = ddim_chain(lambda x, tt, c=c: model(x, tt, c.goal, c.format, c.tone).float(), x_T, scheduler,
                             args.sample_steps, stop=stop).sample
        t_k = torch.full((reward_per_rank,), timesteps[stop], dtype=torch.long, device=device)
        real = meta.rows(rows).to(device)
        no_drop = torch.zeros(reward_per_rank, 3, dtype=torch.bool, device=device)
        with stepper.micro_batch(0) as mb:
            with autocast(device, args.precision):  # one forward of both batches (DDP: one forward per backward)
                eps = ddp(torch.cat([x_t.to(device), x_k]), torch.cat([t.to(device), t_k]),
                          torch.cat([real.goal, c.goal]), torch.cat([real.format, c.format]),
                          torch.cat([real.tone, c.tone]),
                          torch.cat([drop.to(device), no_drop]))
                eps_real, eps_k = eps.float().split([per_rank, reward_per_rank])
                eps_loss = (eps_real - noise.to(device)).square().mean()
                image = clean_estimate(scheduler, eps_k, t_k, x_k)
                reward = grammar_reward(image, encoder, args.reward_source, abstractor).mean()
            stepper.backward(eps_loss - args.reward_weight * reward)
        if mb.step and stepper.step():
            kill_point(args.kill_at_step, stepper.steps)
        evals["evals"] += args.batch_size + args.reward_batch * (stop + 1)
        sums += torch.stack([eps_loss.detach(), reward.detach()]).double().cpu()
        count += 1
        dash.update(it + 1, eps=eps_loss.detach(), reward=reward.detach())
        if (it + 1) % args.log_every == 0 or it + 1 == args.steps:
            mean = all_reduce_mean((sums / count).to(device)).tolist()
            record = {"opt_step": stepper.steps, "train_eps_mse": mean[0], "train_reward": mean[1],
                      "evals": evals["evals"], "time_s": time.perf_counter() - t0}
            log.log(it + 1, **record)
            dash.write(f"step {it + 1}/{args.steps}: eps MSE {mean[0]:.4f}, reward (soft, x0 estimate) {mean[1]:.4f}")
            sums, count = torch.zeros(2, dtype=torch.float64), 0
            if (it + 1) % args.ckpt_every == 0 or it + 1 == args.steps:
                ckpt.save(it + 1, {**state, **evals})
    dash.close()
    records = log.read() if info.is_main else []
    log.close()
    model.eval()
    run.checkpoints(DECODER_DIR, keep_last=1).save(args.steps, {"model": model})
    train_time = time.perf_counter() - t0

    # --- evaluate: the same held-out conditions and noise before and after, best-of-N -----------
    n = min(args.eval_samples, len(val))
    real = val.get_batch(range(n))
    cond = Conditions(real.goal, real.format, real.tone)
    bs = max(8, 64 // info.world_size)
    judged_real = judge.judge(real.image, bs, device)
    noise = start_noise(n, args.size, args.seed + 1)
    sample_kw = {"scale": args.scale, "steps": args.sample_steps, "batch_size": bs, "device": device,
                 "precision": args.precision}
    results, shown = {"real held-out": fidelity(judged_real, cond)}, [real.image[:args.grid]]
    for name, net in (("un-tuned", untuned), ("tuned", model)):
        samples = generate(net, scheduler, noise, cond, **sample_kw)
        judged = judge.judge(samples, bs, device)
        results[name] = {**fidelity(judged, cond), "frechet": frechet_distance(judged.features, judged_real.features)}
        shown.append(samples[:args.grid])
    n_equal = 1 + evals["evals"] / (n * args.sample_steps)
    ns = best_of_sizes(n_equal, args.max_best_of)
    best = best_of_n(untuned, scheduler, judge, cond, ns, size=args.size, seed=args.seed + 1, **sample_kw)

    # --- report ----------------------------------------------------------------------------------
    if info.is_main:
        table = report_table(results, best, n_equal, n, args.sample_steps)
        print("\n" + table)
        summary = {"world_size": info.world_size, "device": str(device), "decoder": args.decoder,
                   "reward_source": args.reward_source, "reward_weight": args.reward_weight,
                   "optimizer_steps": stepper.steps, "finetune_evals": evals["evals"], "records": len(records),
                   "eval_samples": n, "sample_steps": args.sample_steps, "results": results,
                   "best_of_n": {str(k): v for k, v in best.items()}, "n_equal_evals": n_equal, "table": table,
                   "plots": [Path(save_grid(run.file("reward_samples.png"), shown)).name],
                   "train_time_s": train_time, "wall_time_s": time.perf_counter() - t_start,
                   "cpu_time_s": time.process_time() - cpu_start}
        print(f"\nwrote {run.write_json('summary.json', summary)}")
    run.finish()
    teardown_distributed()


def best_of_sizes(n_equal: float, max_power: int) -> list[int]:
    """The N of the best-of-N rows: 1, 2, 4, ... up to ``max_power``, and the equal-evaluation N (never capped)."""
    return sorted({*(2 ** i for i in range(int(math.log2(max_power)) + 1)), int(n_equal)})


def report_table(results: dict[str, dict], best: dict[int, float], n_equal: float, n: int, steps: int) -> str:
    lines = [f"reward fine-tuning: {n} held-out conditions, DDIM {steps} steps, the same noise before and after",
             f"{'':<26}{'grammar':>9}{'abstractor':>11}{'FED':>9}{'goal acc':>9}{'format acc':>11}", "-" * 75]
    for name, r in results.items():
        fed = f"{r['frechet']:>9.3f}" if "frechet" in r else f"{'':>9}"
        lines.append(f"{name:<26}{r['grammar_mean']:>9.4f}{r['grammar_abstractor_mean']:>11.4f}{fed}"
                     f"{r['goal_accuracy']:>9.3f}{r['format_accuracy']:>11.3f}")
    for k, v in best.items():
        mark = " (equal evaluations)" if k == int(n_equal) else ""
        lines.append(f"{f'best-of-{k} un-tuned{mark}':<26}{v:>9.4f}")
    lines.append(f"grammar: mean of the 4 formula scores on the encoder's hard F; abstractor: its grammar head's "
                 f"estimate; FED: Frechet encoder distance to the real designs. Equal sampler evaluations: "
                 f"N = {n_equal:.2f} (fine-tuning's denoiser evaluations spent as extra samples).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
