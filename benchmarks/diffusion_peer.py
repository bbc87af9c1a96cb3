"""The U-Net as a class-conditional diffusion backbone: blockyard vs diffusers, same budget, one run.

A class-conditional DDPM on scikit-learn's 8x8 grey digits (1,797 images, 80% train): T=1000
cosine schedule, epsilon prediction, the label dropped to a null token 10% of the time (for
classifier-free guidance), AdamW with one-cycle, DDIM with 50 steps (with x0 clipped to [-1, 1] and
the direction term either re-derived from the clipped x0 or the model's own eps: ``--ddim-eps``).
Every network sees the same data, batch order, noise, timesteps and sampler noise. Samples are judged by a logistic
regression fitted on the real training images: the score is the fraction of samples classified
as the label they were generated for; the same classifier's accuracy on held-out real images is
the ceiling.

Networks (``--nets``, separated by ';', each trained for every ``--seeds`` in turn):

- ``peer``: diffusers ``UNet2DConditionModel`` (block_out_channels 16,32,32, one layer per block,
  cross-attention down and up blocks; the label as one context token; 387k parameters).
- ``ours``: blockyard ``UNet`` (widths 28,56,56, 374k parameters) with its defaults, the timestep
  through an MLP on ``timestep_embedding`` as ``cond``, the label as one context token.
- ``ours:key=value,...`` variants: any ``UNet`` keyword (``stem=projection``, ``context_levels=3``,
  ``time_conditioning=scale_shift``, ``blocks_per_level=2``, ``context_block=transformer``),
  ``widths=32/64/64``, ``steps=9000`` (this network's own budget: the default table's
  equal-wall-time row), ``seeds=0/1`` (its own seeds instead of ``--seeds``), ``label=cond`` (the
  label embedding added to the timestep vector instead of, or with ``label=both`` as well as, the
  context) and ``gates=random`` (the identity-at-init gates, FiLM and the cross-attention output,
  start from torch's default Linear init).

The time per step is measured apart from the training runs, in 5 interleaved rounds of every
network, so that a change of machine load falls on all of them alike.

diffusers and scikit-learn come from a separate virtualenv, never from blockyard's dependencies::

    python -m venv --system-site-packages /tmp/peer && /tmp/peer/bin/pip install diffusers scikit-learn
    /tmp/peer/bin/python benchmarks/diffusion_peer.py --jobs 2   # two training runs at a time, 1 thread each
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn

from blockyard.blocks import MLP, DDPMScheduler, UNet, count_parameters, timestep_embedding
from blockyard.train import Stepper, one_cycle

NULL = 10  # the dropped label's index


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="peer;ours;ours:stem=projection;ours:steps=9000,seeds=0",
                   help="networks, separated by ';' (or ',' when none has options), e.g. 'peer;ours:context_levels=3'")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="one-cycle peak")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--samples", type=int, default=50, help="samples per class and guidance scale")
    p.add_argument("--scales", default="1,3", help="guidance scales")
    p.add_argument("--ddim-eps", default="clipped",
                   help="DDIM direction term: 'clipped' (eps re-derived from the clipped x0, blockyard's "
                        "default) and/or 'given' (the model's eps, diffusers' default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs in parallel processes, --threads split between them (timing stays serial)")
    p.add_argument("--time-steps", type=int, default=20, help="steps per interleaved timing round")
    return p.parse_args()


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    tr, te = order[:n_train], order[n_train:]
    return x[tr, None], y[tr], x[te, None], y[te]


def fit_judge(x_train: torch.Tensor, y_train: torch.Tensor):
    from sklearn.linear_model import LogisticRegression

    judge = LogisticRegression(max_iter=5000)
    judge.fit(x_train.flatten(1).numpy(), y_train.numpy())
    return judge


def judge_accuracy(judge, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = judge.predict(x.clamp(-1, 1).flatten(1).numpy())
    return float((torch.from_numpy(pred) == y).double().mean())


class OursDenoiser(nn.Module):
    """blockyard UNet with the timestep as FiLM ``cond`` and the label as a context token (or in ``cond``)."""

    def __init__(self, widths=(28, 56, 56), label: str = "context", gates: str = "identity", **unet_kw) -> None:
        super().__init__()
        if gates not in ("identity", "random"):
            raise ValueError(f"gates: expected 'identity' or 'random', got {gates!r}")
        if label not in ("context", "cond", "both"):
            raise ValueError(f"label: expected 'context', 'cond' or 'both', got {label!r}")
        self.label_mode, self.tdim = label, widths[0]
        cond_dim = 4 * widths[0]
        self.time = MLP(widths[0], hidden=(cond_dim,), out_dim=cond_dim)
        ctx = widths[-1]
        self.label = nn.Embedding(NULL + 1, cond_dim if label == "cond" else ctx)
        self.label_cond = nn.Embedding(NULL + 1, cond_dim) if label == "both" else None
        self.unet = UNet(1, 1, widths, cond_dim=cond_dim, context_dim=None if label == "cond" else ctx, **unet_kw)
        if gates == "random":  # the identity-at-init gates (FiLM, cross-attention output) get torch's Linear init
            for name, m in self.unet.named_modules():
                if isinstance(m, nn.Linear) and (name.endswith("film.proj") or name.endswith("attn.proj")):
                    nn.Linear.reset_parameters(m)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cond = self.time(timestep_embedding(t, self.tdim))
        if self.label_mode == "cond":
            return self.unet(x, cond + self.label(y))
        if self.label_cond is not None:
            cond = cond + self.label_cond(y)
        return self.unet(x, cond, self.label(y)[:, None])


class PeerDenoiser(nn.Module):
    """diffusers UNet2DConditionModel with the label as one context token."""

    def __init__(self, widths=(16, 32, 32), ctx: int = 64) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.label = nn.Embedding(NULL + 1, ctx)
        self.unet = UNet2DConditionModel(
            sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=widths,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=ctx, attention_head_dim=8, norm_num_groups=8)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.label(y)[:, None]).sample


def _value(text: str):
    if "/" in text:  # widths=28/56/56
        return tuple(int(v) for v in text.split("/"))
    if text.lstrip("-").replace(".", "").isdigit():
        return float(text) if "." in text else int(text)
    return text


def seeds_of(spec: str, seeds: str) -> list[int]:
    """The training seeds of a ``--nets`` entry: its own ``seeds=0/1`` or ``--seeds``."""
    for item in spec.partition(":")[2].split(","):
        if item.startswith("seeds="):
            seeds = item[len("seeds="):].replace("/", ",")
    return [int(s) for s in seeds.split(",")]


def build(spec: str, steps: int) -> tuple[nn.Module, int]:
    """The network a ``--nets`` entry names and its step budget (``steps=N`` overrides ``--steps``)."""
    name, _, opts = spec.partition(":")
    kw = dict(item.split("=", 1) for item in filter(None, opts.split(",")))
    kw = {key: _value(value) for key, value in kw.items()}
    steps = kw.pop("steps", steps)
    kw.pop("seeds", None)  # read by seeds_of
    if name == "peer" and not kw:
        return PeerDenoiser(), steps
    if name != "ours":
        raise ValueError(f"--nets: expected 'peer', 'ours' or 'ours:key=value,...', got {spec!r}")
    return OursDenoiser(**kw), steps


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, sched: DDPMScheduler, args, seed: int,
          steps: int) -> float:
    """Train with the same batches, noise, timesteps and label drops for every network; return seconds."""
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    stepper = Stepper(net, opt, clip_value=1.0, schedule=lambda s: one_cycle(s, steps, args.lr))
    g = torch.Generator().manual_seed(1000 + seed)
    net.train()
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(y), (args.batch_size,), generator=g)
        x0, labels = x[rows], y[rows].clone()
        labels[torch.rand(args.batch_size, generator=g) < 0.1] = NULL
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.num_steps, (args.batch_size,), generator=g)
        with stepper.micro_batch(0):
            loss = (net(sched.add_noise(x0, noise, t), t, labels) - noise).square().mean()
            stepper.backward(loss)
        stepper.step()
    return time.perf_counter() - start


@torch.no_grad()
def sample(net: nn.Module, sched: DDPMScheduler, labels: torch.Tensor, scale: float, seed: int,
           clipped: bool = True) -> torch.Tensor:
    net.eval()

    def guided(x_t, t, y):
        if scale == 1.0:
            return net(x_t, t, y)
        eps = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]))
        cond, uncond = eps.chunk(2)
        return uncond + scale * (cond - uncond)

    return sched.sample(guided, (len(labels), 1, 8, 8), steps=50, generator=torch.Generator().manual_seed(seed),
                        use_clipped_model_output=clipped, y=labels)


@functools.lru_cache(maxsize=1)
def setup():
    """Data split, judge and noise schedule (the same in every process)."""
    x_tr, y_tr, x_te, y_te = load_digits_split()
    judge = fit_judge(x_tr, y_tr)
    sched = DDPMScheduler(1000, schedule="squaredcos_cap_v2")
    return x_tr, y_tr, judge, (judge_accuracy(judge, x_te, y_te), len(y_te)), sched


def variants_of(args) -> list[tuple[str, float]]:
    variants = [(e, float(s)) for e in args.ddim_eps.split(",") for s in args.scales.split(",")]
    if any(e not in ("clipped", "given") for e, _ in variants):
        raise SystemExit(f"--ddim-eps: expected 'clipped' and/or 'given', got {args.ddim_eps!r}")
    return variants


def train_and_judge(spec: str, seed: int, args, threads: int) -> tuple[int, list[float], int, float]:
    """Train one network from ``seed`` and judge its samples: (parameters, accuracies, steps, seconds)."""
    torch.set_num_threads(threads)
    x_tr, y_tr, judge, _, sched = setup()
    labels = torch.arange(10).repeat_interleave(args.samples)
    torch.manual_seed(seed)
    net, steps = build(spec, args.steps)
    seconds = train(net, x_tr, y_tr, sched, args, seed, steps)
    accs = [judge_accuracy(judge, sample(net, sched, labels, s, seed, e == "clipped"), labels)
            for e, s in variants_of(args)]
    return count_parameters(net), accs, steps, seconds


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    x_tr, y_tr, _, (ceiling, n_held), sched = setup()
    variants = variants_of(args)
    labels = torch.arange(10).repeat_interleave(args.samples)
    print(f"8x8 digits: {len(y_tr)} train, {n_held} held out; judge accuracy on held-out real images "
          f"(the ceiling) {ceiling:.3f}; {args.steps} steps of batch {args.batch_size}, {len(labels)} samples "
          f"per scale, DDIM 50")
    specs = list(filter(None, args.nets.split(";") if ";" in args.nets or ":" in args.nets else args.nets.split(",")))
    # Per-step time, measured in interleaved rounds so that a change of machine load hits every network alike.
    rounds = {spec: [] for spec in specs}
    for _ in range(5):
        for spec in specs:
            torch.manual_seed(0)
            net, _ = build(spec, args.steps)
            rounds[spec].append(1e3 * train(net, x_tr, y_tr, sched, args, 0, args.time_steps) / args.time_steps)
    ms = {spec: sorted(r)[len(r) // 2] for spec, r in rounds.items()}
    columns = [e + " x" + format(s, "g") for e, s in variants]
    header = f"{'network':<44}{'params':>9}" + "".join(f"{c:>12}" for c in columns) + f"{'steps':>7}{'train s':>9}"
    print(header + "\n" + "-" * len(header), flush=True)
    runs = [(spec, seed) for spec in specs for seed in seeds_of(spec, args.seeds)]
    threads = max(1, args.threads // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_and_judge, spec, seed, args, threads) for spec, seed in runs]
        results = {spec: [] for spec in specs}
        for (spec, seed), future in zip(runs, futures):
            params, accs, steps, seconds = future.result()
            results[spec].append(accs)
            print(f"{spec + f' (seed {seed})':<44}{params:>9,}" + "".join(f"{a:>12.3f}" for a in accs)
                  + f"{steps:>7}{seconds:>9.0f}", flush=True)
    print(f"\nmedian [IQR] over each network's seeds; ms/step: median of 5 interleaved rounds of "
          f"{args.time_steps} steps")
    header = f"{'network':<44}" + "".join(f"{c:>22}" for c in columns) + f"{'ms/step':>9}"
    print(header + "\n" + "-" * len(header))
    for spec in specs:
        cells = [median_iqr([row[i] for row in results[spec]]) for i in range(len(columns))]
        print(f"{spec:<44}" + "".join(f"{c:>22}" for c in cells) + f"{ms[spec]:>9.1f}")


def median_iqr(values: list[float]) -> str:
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return f"{q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]" if len(values) > 1 else f"{q[1]:.3f}"


if __name__ == "__main__":
    main()
