"""Design decomposition, stage 5 (Module 9): latent optimisation of the start noise for the grammar score.

System: design decomposition. For held-out designs' metadata, the start noise x_T of the frozen
decoder (--decoder: a stage-3 or stage-4 run folder) is fixed, then optimised: each iteration
runs the deterministic DDIM chain (--chain-steps, eta 0) with autograd (design/diffusion.py's
ddim_chain, one torch.utils.checkpoint segment per step with --checkpoint), scores the sample
with the grammar formulas on the frozen encoder's soft F (design/reward.py), takes an Adam step
on x_T up the reward, and puts x_T back on the Gaussian shell (each sample rescaled to norm
sqrt(d), d = 3 H W, where standard normal noise concentrates). Only x_T changes: the
metadata stays the conditions' (the seed optimised goal and format through ``.long()``, which
passes no gradient, with fresh noise every iteration and an incorrect DDIM).

Report (the same conditions): the mean grammar score (formulas on the encoder's hard F) of the
chain's samples before and after, against best-of-N from fresh noise at equal model
evaluations: N = --iters + 1, one chain per iteration plus the final one (each iteration's
backward pass is not counted: it costs about two more forward passes, so best-of-N gets the
smaller budget); the Frechet encoder distance and conditioning fidelity before and after; and
latent_sequence.png (one row per design: the sample after each iteration, the first column
before any).

    python examples/design_latent.py                      # after design_decoder.py
    python examples/design_latent.py --decoder runs/design/reward --out runs/design/latent-tuned
    torchrun --standalone --nproc_per_node=2 examples/design_latent.py --resume auto

Defaults: 32 conditions, 15 iterations of Adam --lr 0.05 on a 10-step chain, bf16 autocast.
--smoke: 4 conditions, 3 iterations, a 4-step chain.

Writes to --out: run.json, checkpoints/ (x_T and the optimizer), metrics.jsonl, summary.json,
latent_sequence.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from design.diffusion import ddim_chain, guided_eps, load_decoder
from design.frechet import frechet_distance
from design.models import load_abstractor, load_encoder
from design.reward import grammar_reward, to_image
from design.sampling import Conditions, Judge, best_of_n, fidelity, generate, save_grid, start_noise
from design.stage import add_data_args, data_dir, open_data

from blockyard.blocks import DDPMScheduler
from blockyard.train import (
    Dashboard,
    RunDir,
    add_common_args,
    all_reduce_sum,
    autocast,
    kill_point,
    main_print,
    run_config,
    seed_everything,
    setup_distributed,
    teardown_distributed,
)

#: flag -> (CPU default, --smoke, --seed-scale)
SIZES = {"designs": (20_000, 300, 10_000), "size": (64, 64, 256), "conditions": (32, 4, 64), "iters": (15, 3, 30),
         "chain_steps": (10, 4, 20), "show": (8, 2, 8)}
IGNORE = ("data", "workers", "encoder", "abstractor", "decoder", "show")


class Latents(nn.Module):
    """The optimised start noise of every condition and the path of the shown ones (a module, so the
    checkpoint manager saves both).

    Shapes:
        - x_T: ``(N, 3, H, W)``; history: ``(iters + 1, show, 3, H, W)``, row ``k`` = after iteration ``k``
    """

    def __init__(self, x_T: torch.Tensor, iters: int, show: int) -> None:
        super().__init__()
        self.x_T = nn.Parameter(x_T.clone())
        self.register_buffer("history", x_T[:show].clone().expand(iters + 1, *x_T[:show].shape).clone())

    @torch.no_grad()
    def project(self) -> None:
        """Rescale each sample to norm ``sqrt(d)``: the shell where ``N(0, I_d)`` concentrates."""
        norm = self.x_T.flatten(1).norm(dim=1).clamp_min(1e-12)
        self.x_T.mul_((self.x_T[0].numel() ** 0.5 / norm).view(-1, 1, 1, 1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/design/latent", lr=0.05, precision="bf16")
    add_data_args(p)
    p.add_argument("--decoder", default=None, help="finished stage-3/4 run folder (default OUT/../decoder)")
    p.add_argument("--encoder", default=None, help="finished stage-1 run folder (default OUT/../encoder)")
    p.add_argument("--abstractor", default=None, help="finished stage-2 run folder (default OUT/../abstractor)")
    p.add_argument("--conditions", type=int, default=None, help="held-out conditions, one x_T each (default 32)")
    p.add_argument("--iters", type=int, default=None, help="optimisation iterations (default 15)")
    p.add_argument("--chain-steps", type=int, default=None, help="DDIM steps of the chain (default 10)")
    p.add_argument("--scale", type=float, default=1.0, help="guidance scale inside the chain")
    p.add_argument("--checkpoint", type=int, default=0, choices=[0, 1],
                   help="1: recompute each chain step in the backward (memory of one step)")
    p.add_argument("--show", type=int, default=None, help="designs in latent_sequence.png (default 8)")
    p.add_argument("--seed-scale", action="store_true", help="256 px sizes (with a decoder trained at 256 px)")
    args = p.parse_args(argv)
    column = 1 if args.smoke else 2 if args.seed_scale else 0
    for key, values in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, values[column])
    out = Path(args.out).resolve().parent
    for name in ("decoder", "encoder", "abstractor"):
        setattr(args, name, getattr(args, name) or str(out / name))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    run = RunDir(args.out, run_config(args, ignore=IGNORE), resume=args.resume, overwrite=args.overwrite)
    device, say = info.device, main_print(info.is_main)
    seed_everything(args.seed)
    t_start, cpu_start = time.perf_counter(), time.process_time()  # CPU: this process, all threads

    # --- data, the frozen decoder and critics -----------------------------------------------------
    splits = open_data(data_dir(args.data, args.out, args.smoke, args.size), args.designs, args.size, args.data_seed,
                       args.workers, info.is_main)
    val = splits.val
    n = min(args.conditions, len(val))
    real = val.get_batch(range(n))
    cond = Conditions(real.goal, real.format, real.tone)
    encoder, abstractor = load_encoder(args.encoder, device), load_abstractor(args.abstractor, device)
    judge = Judge(encoder, abstractor)
    decoder = load_decoder(args.decoder, device).requires_grad_(False)
    scheduler = DDPMScheduler().to(device)
    say(f"{n} conditions, x_T optimised through a {args.chain_steps}-step DDIM chain of the decoder in {args.decoder}; "
        f"world {info.world_size} on {device}, {args.precision}")

    # --- optimise x_T: every rank its rows, the gradient summed so every rank keeps all of x_T ------
    noise = start_noise(n, args.size, args.seed + 1)
    shown = min(args.show, n)
    latents = Latents(noise, args.iters, shown).to(device)
    optimizer = torch.optim.Adam(latents.parameters(), lr=args.lr)
    state = {"latents": latents, "optimizer": optimizer}
    ckpt = run.checkpoints("checkpoints", keep_last=1)
    resumed = run.resume_from(ckpt, state)
    start = resumed["step"] if resumed else 0
    log = run.metrics_log("metrics.jsonl", resumed, key="step")
    mine = torch.arange(info.rank, n, info.world_size)
    c = cond.rows(mine).to(device)

    def eps_fn(x, t):
        return guided_eps(decoder, x, t, c.goal, c.format, c.tone, args.scale).float()

    dash = Dashboard(args.iters, every_s=15, is_main=info.is_main, desc="latent ")
    t0 = time.perf_counter()
    for it in range(start, args.iters):
        with autocast(device, args.precision):
            x0 = ddim_chain(eps_fn, latents.x_T[mine.to(device)], scheduler, args.chain_steps,
                            use_checkpoint=bool(args.checkpoint)).sample
        image = to_image(x0)
        reward = grammar_reward(image, encoder).mean(dim=1)
        optimizer.zero_grad(set_to_none=True)
        (-reward.sum()).backward()
        latents.x_T.grad = all_reduce_sum(latents.x_T.grad)
        optimizer.step()
        latents.project()
        latents.history[it + 1] = latents.x_T.detach()[:shown]
        mean = float(all_reduce_sum(reward.detach().sum()) / n)
        log.log(it + 1, reward_before_step=mean, time_s=time.perf_counter() - t0)
        dash.update(it + 1, reward=mean)
        ckpt.save(it + 1, state)
        kill_point(args.kill_at_step, it + 1)
    dash.close()
    records = log.read() if info.is_main else []
    log.close()
    opt_time = time.perf_counter() - t0

    # --- evaluate: before / after on every condition, against best-of-N at equal evaluations -------
    bs = max(8, 64 // info.world_size)
    kw = {"scale": args.scale, "steps": args.chain_steps, "batch_size": bs, "device": device,
          "precision": args.precision}
    judged_real = judge.judge(real.image, bs, device)
    results = {"real held-out": fidelity(judged_real, cond)}
    for name, x_T in (("before (x_T drawn)", noise), ("after (x_T optimised)", latents.x_T.detach().cpu())):
        judged = judge.judge(generate(decoder, scheduler, x_T, cond, **kw), bs, device)
        results[name] = {**fidelity(judged, cond), "frechet": frechet_distance(judged.features, judged_real.features)}
    steps_shown = latents.history.shape[0]
    frames = generate(decoder, scheduler, latents.history.flatten(0, 1).cpu(),
                      Conditions(*(v[:shown].repeat(steps_shown) for v in cond)), **kw)
    n_equal = args.iters + 1
    best = best_of_n(decoder, scheduler, judge, cond, sorted({1, 2, 4, n_equal}), size=args.size,
                     seed=args.seed + 1, **kw)

    # --- report ----------------------------------------------------------------------------------
    if info.is_main:
        table = report_table(results, best, n_equal, n, args.chain_steps)
        print("\n" + table)
        summary = {"world_size": info.world_size, "device": str(device), "decoder": args.decoder, "conditions": n,
                   "iters": args.iters, "chain_steps": args.chain_steps, "results": results,
                   "best_of_n": {str(k): v for k, v in best.items()}, "n_equal_evals": n_equal,
                   "reward_curve": [r["reward_before_step"] for r in records], "table": table,
                   "optimisation_time_s": opt_time,
                   "wall_time_s": time.perf_counter() - t_start,
                   "cpu_time_s": time.process_time() - cpu_start}
        rows = list(frames.view(steps_shown, shown, *frames.shape[1:]).transpose(0, 1))
        summary["plots"] = [Path(save_grid(run.file("latent_sequence.png"), rows)).name]
        print(f"\nwrote {run.write_json('summary.json', summary)}")
    run.finish()
    teardown_distributed()


def report_table(results: dict[str, dict], best: dict[int, float], n_equal: int, n: int, steps: int) -> str:
    lines = [f"latent optimisation: {n} held-out conditions, a {steps}-step DDIM chain (eta 0)",
             f"{'':<28}{'grammar':>9}{'abstractor':>11}{'FED':>9}{'goal acc':>9}{'format acc':>11}", "-" * 77]
    for name, r in results.items():
        fed = f"{r['frechet']:>9.3f}" if "frechet" in r else f"{'':>9}"
        lines.append(f"{name:<28}{r['grammar_mean']:>9.4f}{r['grammar_abstractor_mean']:>11.4f}{fed}"
                     f"{r['goal_accuracy']:>9.3f}{r['format_accuracy']:>11.3f}")
    for k, v in best.items():
        mark = " (equal evaluations)" if k == n_equal else ""
        lines.append(f"{f'best-of-{k}{mark}':<28}{v:>9.4f}")
    lines.append(f"grammar: mean of the 4 formula scores on the encoder's hard F; equal evaluations: {n_equal} "
                 "chains, one per iteration and the final one (backward passes not counted).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
