"""XEC calorimeter: FCMAE-pretrained ConvNeXt-V2 / graph-attention encoder, fine-tuned to regress the source.

System: the machine-learning pipeline of the MEG II XEC liquid-xenon calorimeter. 4760
photo-sensors on six faces see the scintillation light of a point source; examples/xec/ builds
the geometry and a synthetic event generator (Poisson photon counts, times with jitter and a
validity threshold, 1 % dead channels). The encoder (examples/xec/model.py) reads each image face
with a masked ConvNeXt-V2 CNN, the two hex faces with graph attention, and fuses seven face tokens
with a transformer; --pos-enc picks how it tells the faces apart (examples/xec/posenc.py).

The run, in stages (each with its own metrics.jsonl and checkpoints under --out):

1. ``pretrain``: FCMAE masked autoencoding. 60 % of the live sensors of every event are hidden
   (``random_mask`` with valid = not dead); the encoder sees only the rest (hidden and dead sensors
   masked), the decoder reconstructs normalised npho, the loss counts the hidden live sensors only.
2. ``finetune``: regression of (u, v, w, energy, t0), standardised, from the pretrained encoder,
   with an EMA of the weights used for validation and the test (the seed's regressor recipe).
   ``--head maps`` (the default) adds to the seed's token MLP a soft-argmax read-out of the inner
   face's feature map before pooling (examples/xec/heads.py); ``--prior classical`` (the default)
   makes the network predict a correction to the calibrated classical estimates (``none``: the network
   alone); ``--encoder-lr-scale`` lowers the pretrained
   encoder's lr, ``--channel-dropout`` hides extra live sensors in training.
3. ``scratch`` (``--scratch on``): the same model and recipe from a random init for the same number
   of steps, so the run says whether pretraining helped.
4. ``inpaint`` (``--inpaint on``, the default): dead-channel inpainting heads (examples/xec/inpaint.py)
   on the frozen pretrained encoder, a CNN per face grid and a graph head per hex face, trained to
   predict npho and time of randomly hidden live sensors and (``--inpaint-dead-targets on``, the
   default) of the dead map's sensors on the events' alive twins, as a correction to a blend of the two
   classical fill-ins whose weight per face and channel is fitted on the training events by least
   squares before training (the untrained heads are that blend). Scored on the test events with random masks
   and with the detector's dead-channel map (events simulated with every sensor alive, so the truth
   behind the dead channels is known), per face, against the average of the visible neighbours and the
   face mean on the same sensors.

``--study labels`` runs the label-budget sweep instead: per seed one pretraining on ``--train-events``
unlabelled events, then per ``--label-budgets`` entry a fine-tuned and a from-scratch regressor of
``--study-steps`` optimizer steps each; it prints the median [IQR] over ``--seeds`` of each target's
test RMSE. ``--scheduler`` (cosine, onecycle, plateau) sets every stage's lr schedule.

The test table gives per-target resolution (RMSE and the 68 % half-width of |residual|, the seed's
metric) for the training-mean predictor, classical estimators (calibrated npho centroid, total npho,
time-of-flight-corrected mean time) and both networks.

    python examples/xec_mae.py --smoke
    torchrun --standalone --nproc_per_node=2 examples/xec_mae.py --out /tmp/xec_run
    torchrun --standalone --nproc_per_node=2 examples/xec_mae.py --resume auto
    torchrun --standalone --nproc_per_node=2 examples/xec_mae.py --labeled 512 --epochs 16 --overwrite
    python examples/xec_mae.py --study labels --label-budgets 256,1024,4096 --seeds 0,1,2 --out /tmp/xec_labels

The default run (4096 events; pretraining, fine-tuning and scratch 2 epochs, inpainting 16 epochs, of 128
steps of 32 events each) took 13 min 32 s with 2 processes on 2 CPU cores (the defaults --head maps
--prior classical).
fp32 is the default because bf16 autocast measured 2x slower on that CPU. --epochs is the fine-tune
and scratch epochs, --lr their AdamW lr, --batch-size the global micro-batch (--accum micro-batches
per optimizer step).

Writes to --out: run.json, <stage>/metrics.jsonl and <stage>/checkpoints, summary.json, predictions.png,
inpaint_random_<face>.png and inpaint_dead_<face>.png (truth, masked input, inpainted, neighbour average).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xec.batches import Classical, Split, channel_dropout, resolution
from xec.events import TARGET_NAMES
from xec.geometry import FACE_NAMES, build_geometry
from xec.heads import HEADS, MapRegressor, TokenRegressor
from xec.inpaint import XECInpainter, inpaint_loss, masked_batch
from xec.inpaint_eval import evaluate_batch, expected_truth, format_table, plot_face_maps, summarise
from xec.mae import XECMAE, mae_loss
from xec.model import XECEncoder
from xec.posenc import POS_ENCODINGS

from blockyard.blocks import count_parameters, random_mask
from blockyard.data import rank_batches
from blockyard.train import (
    EMA,
    Dashboard,
    EarlyStopping,
    Plateau,
    RunDir,
    Stepper,
    add_common_args,
    all_reduce_sum,
    autocast,
    kill_point,
    main_print,
    one_cycle,
    per_rank_batch,
    predict_rows,
    pyplot,
    run_config,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    warmup_cosine,
    wrap_ddp,
)

UNITS = {"u": "cm", "v": "cm", "w": "cm", "energy": "MeV", "t0": "ns"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out="runs/xec", epochs=2, lr=1e-3)
    p.add_argument("--train-events", type=int, default=None, help="default 4096 (smoke 32)")
    p.add_argument("--labeled", type=int, default=None,
                   help="label only the first N training events for fine-tune/scratch (default all)")
    p.add_argument("--val-events", type=int, default=None, help="default 512 (smoke 16)")
    p.add_argument("--test-events", type=int, default=None, help="default 10240 (smoke 16)")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="FCMAE epochs (default 2)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--mae-lr", type=float, default=1e-3, help="AdamW lr of the pretraining")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="seed regressor: 1e-4")
    p.add_argument("--mae-weight-decay", type=float, default=5e-5, help="seed MAE: 5e-5")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup steps as a fraction of a stage's steps")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="hidden fraction of the live sensors (seed 0.6)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the regressors (seed 0.999)")
    p.add_argument("--ema-warmup", choices=("on", "off"), default="on",
                   help="on: timm's decay warmup min(d, 1 - t^(-2/3)), about 0.975 after 256 steps; off: the seed's "
                        "constant d from the second step (default on)")
    p.add_argument("--pos-enc", choices=POS_ENCODINGS, default="learned",
                   help="how the fusion transformer tells the 7 face tokens apart: an added learned (the seed's), "
                        "sinusoidal (token index) or geometric (face centres) table, or rope (token index) / alibi "
                        "(face-centre distances) in the attention (default learned)")
    p.add_argument("--head", choices=HEADS, default="maps",
                   help="regression head: tokens (the seed's MLP on the 7 fused tokens) or maps (also a soft-argmax "
                        "read-out of the inner face's feature map, before pooling; default maps)")
    p.add_argument("--prior", choices=("none", "classical"), default="classical",
                   help="classical (the default): the calibrated classical estimates are an input and the base of "
                        "the output, the network predicts a correction to them; none: the network alone")
    p.add_argument("--scratch", choices=("on", "off"), default="on",
                   help="stage 3, the from-scratch control (default on)")
    p.add_argument("--encoder-lr-scale", type=float, default=1.0,
                   help="fine-tuning lr of the pretrained encoder as a fraction of --lr (the head gets --lr; "
                        "default 1)")
    p.add_argument("--channel-dropout", type=float, default=0.0,
                   help="fine-tune and scratch: hide this further fraction of the live sensors of every training "
                        "event, as if dead (default 0)")
    p.add_argument("--scheduler", choices=("cosine", "onecycle", "plateau"), default="cosine",
                   help="lr schedule of every stage: cosine (linear warmup, cosine to 0.01 lr), onecycle (OneCycleLR's "
                        "cosine policy, --warmup as pct_start) or plateau (linear warmup, then halved after an epoch "
                        "without a better validation loss); default cosine")
    p.add_argument("--study", choices=("run", "labels"), default="run",
                   help="labels: the label-budget sweep instead of the run (one pretraining per seed, then "
                        "fine-tune and scratch per budget; median [IQR] over the seeds)")
    p.add_argument("--label-budgets", default="256,1024,4096", help="labelled events per budget (--study labels)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the sweep (--study labels)")
    p.add_argument("--study-steps", type=int, default=128,
                   help="optimizer steps per regression in the sweep, the same for every budget and arm (whole "
                        "epochs: the nearest multiple of the budget's steps per epoch)")
    p.add_argument("--dim", type=int, default=None, help="CNN width (default 32, smoke 8)")
    p.add_argument("--depth", type=int, default=2, help="ConvNeXt-V2 blocks per image face (smoke 1)")
    p.add_argument("--token-dim", type=int, default=None, help="face token width (default 64, smoke 16)")
    p.add_argument("--patience", type=int, default=10, help="early stopping on the validation loss")
    p.add_argument("--inpaint", choices=("on", "off"), default="on",
                   help="stage 4: inpainting heads on the frozen pretrained encoder, scored per face against the "
                        "neighbour average and the face mean (default on)")
    p.add_argument("--inpaint-epochs", type=int, default=None, help="inpainting epochs (default 16, smoke 2)")
    p.add_argument("--inpaint-lr", type=float, default=2e-3, help="AdamW lr of the inpainting heads")
    p.add_argument("--inpaint-mask-ratio", type=float, default=0.05,
                   help="hidden fraction of the live sensors for inpainting (seed: 0.05, about a dead-channel density)")
    p.add_argument("--inpaint-dead-targets", choices=("on", "off"), default="on",
                   help="on: train on the simulated events' alive twins, where the dead map's sensors are hidden in "
                        "every event and are targets too, like the randomly hidden live sensors (an inpainter for a "
                        "detector's known dead channels is trained on simulation); off: only the randomly hidden "
                        "live sensors are targets (default on)")
    p.add_argument("--inpaint-hidden", type=int, default=None,
                   help="width of the inpainting heads (default 16, smoke 8)")
    args = p.parse_args(argv)
    for key, full, tiny in (("train_events", 4096, 32), ("val_events", 512, 16), ("test_events", 10240, 16),
                            ("batch_size", 32, 8), ("dim", 32, 8), ("token_dim", 64, 16), ("inpaint_epochs", 16, 2),
                            ("inpaint_hidden", 16, 8)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.smoke else full)
    if args.smoke:
        args.depth = 1
    return args


@torch.no_grad()
def predict(model, split: Split, info, precision: str) -> torch.Tensor:
    """Standardised predictions ``(n, 5)`` for every row, computed sharded and gathered on every rank."""
    model.eval()

    def rows_fn(rows: torch.Tensor) -> torch.Tensor:
        with autocast(info.device, precision):
            return model(split.x[rows], split.dead.expand(rows.numel(), -1), split.prior_rows(rows)).float()

    return predict_rows(rows_fn, split.n, 64, info.device)


@torch.no_grad()
def validate_mae(model, split: Split, info, args, sensor_mean: torch.Tensor) -> dict:
    """Masked MSE of the reconstruction on fixed masks, and of the per-sensor training mean."""
    model.eval()
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    masks = random_mask(split.n, split.dead.numel(), args.mask_ratio, valid=~split.dead.expand(split.n, -1).cpu(),
                        generator=gen).to(info.device)
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # model sq. error, mean sq. error, count
    rows = torch.arange(info.rank, split.n, info.world_size, device=info.device)  # each row on one rank
    for i in range(0, rows.numel(), 64):
        r = rows[i:i + 64]
        mask = masks[r]
        with autocast(info.device, args.precision):
            recon = model(split.x[r], mask | split.dead).recon
        target = split.npho[r]
        sums += torch.stack([((recon - target).square() * mask).sum(), ((sensor_mean - target).square() * mask).sum(),
                             mask.sum()]).double()
    sums = all_reduce_sum(sums)
    return {"val_loss": float(sums[0] / sums[2]), "val_sensor_mean_mse": float(sums[1] / sums[2])}


def inpaint_masks(n: int, dead: torch.Tensor, ratio: float, seed: int, device) -> torch.Tensor:
    """Fixed random masks ``(n, 4760)`` of the live sensors (True = hidden), the same on every rank."""
    return random_mask(n, dead.numel(), ratio, valid=~dead.expand(n, -1).cpu(),
                       generator=torch.Generator().manual_seed(seed)).to(device)


@torch.no_grad()
def score_inpainting(model, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, info, args,
                     expected: torch.Tensor | None = None) -> torch.Tensor:
    """Error sums (face, method, channel, stat) of the inpainter, both baselines and, given ``expected``, the true
    source's expectation, over every row of ``x``, each row on one rank, summed over the ranks."""
    model.eval()
    sums = torch.zeros(6, 3 if expected is None else 4, 2, 4, dtype=torch.float64, device=info.device)
    rows = torch.arange(info.rank, x.shape[0], info.world_size, device=info.device)
    for i in range(0, rows.numel(), 64):
        r = rows[i:i + 64]
        with autocast(info.device, args.precision):
            sums += evaluate_batch(model, masked_batch(x[r], mask[r], targets[r]),
                                   None if expected is None else expected[r])[0]
    return all_reduce_sum(sums)


def train_stage(name: str, model, train: Split, epochs: int, lr: float, weight_decay: float, step_loss, validate,
                args, info, run: RunDir, ema: EMA | None = None, steps_before: int = 0, groups=None) -> dict:
    """One stage of AdamW through a Stepper (accumulation, clipping at norm 1, warmup-cosine per optimizer step to
    0.01 lr, EMA); per epoch a validation, a metrics record and a checkpoint; early stopping; resumes from the
    stage's checkpoints; ends with the best weights loaded. ``steps_before``: optimizer steps of the earlier
    stages (``--kill-at-step`` counts the run's steps). ``groups``: AdamW parameter groups, each with an
    ``lr_scale`` (default: one group of every parameter). ``--scheduler`` picks the schedule."""
    micro = train.n // args.batch_size  # micro-batches per epoch (drop_last: every rank the same count)
    if micro < 1:
        raise ValueError(f"--batch-size: {args.batch_size} is larger than the training split ({train.n} events)")
    total = epochs * math.ceil(micro / args.accum)
    warmup = min(int(args.warmup * total), total - 1)
    plateau = Plateau(factor=0.5, patience=0) if args.scheduler == "plateau" else None
    if args.scheduler == "onecycle":
        schedule = lambda s: one_cycle(s, total, lr, pct_start=args.warmup)  # noqa: E731
    elif plateau is not None:  # the plateau's current lr (its last_lr, None before the first reduction check)
        schedule = lambda s: (plateau.last_lr or lr) * min(1.0, (s + 1) / (warmup + 1))  # noqa: E731
    else:
        schedule = lambda s: warmup_cosine(s, total, warmup, lr, min_lr=0.01 * lr)  # noqa: E731
    ddp = wrap_ddp(model, info, forward_sync_buffers=False)  # constant index buffers
    optimizer = torch.optim.AdamW(groups or model.parameters(), lr=lr, weight_decay=weight_decay)
    stepper = Stepper(ddp, optimizer, precision=args.precision, accumulate=args.accum, num_batches=micro,
                      clip_value=1.0, schedule=schedule, ema=ema)
    stopper = EarlyStopping(args.patience)
    state = {"model": model, "optimizer": optimizer, **({"plateau": plateau} if plateau else {}),
             "stepper": stepper, "stopper": stopper, **({"ema": ema} if ema else {})}  # plateau before the stepper
    ckpt = run.checkpoints(f"{name}/checkpoints", keep_last=1)  # one checkpoint per epoch, step = epoch
    resumed = run.resume_from(ckpt, state)
    log = run.metrics_log(f"{name}/metrics.jsonl", resumed)
    dash = Dashboard(total, every_s=15, is_main=info.is_main, desc=f"{name} ")
    if resumed:
        dash.write(f"{name}: resumed from {resumed['path']} (epoch {resumed['step']}, step {stepper.steps})")
    per_rank = per_rank_batch(args.batch_size, info.world_size)
    t0 = time.perf_counter()
    for epoch in range(resumed["step"] + 1 if resumed else 1, epochs + 1):
        if stopper.stopped:
            break
        # the same permutation on every rank and after a resume; each rank its own slice of every batch
        order = rank_batches(train.n, per_rank, epoch, args.seed, info.rank, info.world_size).to(info.device)
        mask_gen = torch.Generator().manual_seed((args.seed * 1000 + epoch) * 64 + info.rank)  # per rank, per epoch
        ddp.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        for i, rows in enumerate(order):
            with stepper.micro_batch(i) as mb:
                loss = step_loss(ddp, rows, mask_gen)
                stepper.backward(loss)
            loss_sum += loss.detach().double()
            if mb.step and stepper.step():
                kill_point(args.kill_at_step, steps_before + stepper.steps)
                dash.update(stepper.steps, epoch=epoch, loss=loss.detach())
        # the last step's lr (step 0's while fp16 overflows have skipped every step so far)
        record = {"epoch": epoch, "opt_step": stepper.steps, "lr": schedule(max(stepper.steps - 1, 0)),
                  "train_loss": float(all_reduce_sum(loss_sum)) / (micro * info.world_size),
                  **validate(ema.module if ema is not None else model), "time_s": time.perf_counter() - t0}
        log.log(epoch, **record)  # before the checkpoint, so a resumed log equals an uninterrupted one
        dash.write(f"{name} epoch {epoch}/{epochs}: train {record['train_loss']:.4f} val {record['val_loss']:.4f}")
        stopper.step(record["val_loss"])  # every rank computed the same validation: same decision
        if plateau is not None:  # the next epoch's lr (the Stepper applies it at its next step)
            plateau.step(record["val_loss"], plateau.last_lr or lr)
        ckpt.save(epoch, state, metric=record["val_loss"])
    dash.close()
    records = log.read() if info.is_main else []
    log.close()
    best = ckpt.load_best({"model": model, **({"ema": ema} if ema else {})})  # every rank: same weights
    return {"parameters": count_parameters(model), "best_epoch": best["step"] if best else None,
            "epochs_run": len(records), "opt_steps": stepper.steps, "skipped_steps": stepper.skipped,
            "train_time_s": time.perf_counter() - t0, "final": records[-1] if records else None}


def pretrain_stage(name: str, unlabeled: Split, val: Split, geometry, kw: dict, args, info, run: RunDir,
                   steps_before: int = 0):
    """Stage 1, FCMAE: ``(model, stage record)``; 60 % of the live sensors hidden, masked MSE on them."""
    device = info.device

    def mae_step(ddp, rows, gen):
        hidden = random_mask(rows.numel(), unlabeled.dead.numel(), args.mask_ratio,
                             valid=~unlabeled.dead.expand(rows.numel(), -1).cpu(), generator=gen).to(device)
        with autocast(device, args.precision):
            recon = ddp(unlabeled.x[rows], hidden | unlabeled.dead).recon
        return mae_loss(recon, unlabeled.npho[rows], hidden)

    sensor_mean = unlabeled.npho.mean(0)
    torch.manual_seed(args.seed + 1)
    mae = XECMAE(XECEncoder(geometry, **kw), geometry).to(device)
    stage = train_stage(name, mae, unlabeled, args.pretrain_epochs, args.mae_lr, args.mae_weight_decay, mae_step,
                        lambda m: validate_mae(m, val, info, args, sensor_mean), args, info, run,
                        steps_before=steps_before)
    return mae, stage


def label(train: Split, val: Split, test: Split, geometry, args) -> Classical:
    """Make ``train`` the labelled part: val and test standardised by its targets, the classical estimators
    calibrated on it and, with ``--prior classical``, their standardised estimates set as every split's prior."""
    for split in (val, test):
        split.standardise(train.mean, train.std)
    classical = Classical(geometry.to("cpu"), train)
    for split in (train, val, test):  # w has no classical estimate: its prior is the training mean (0)
        split.prior = (((classical.predict(split.events) - train.mean.cpu()) / train.std.cpu()).nan_to_num(0.0)
                       .to(train.x.device) if args.prior == "classical" else None)
    return classical


def regress(name: str, encoder: XECEncoder, train: Split, val: Split, test: Split, geometry, args, info,
            run: RunDir, steps_before: int = 0, epochs: int | None = None):
    """Stages 2 and 3: ``(stage record, test predictions (n, 5) in physical units)`` of the EMA model.
    ``--head`` and ``--prior`` pick the model, ``--channel-dropout`` hides more live sensors in training,
    ``--encoder-lr-scale`` scales the encoder's lr when it is pretrained (``name`` ending in ``finetune``)."""
    device = info.device

    def regression_loss(ddp, rows, gen):
        mask = channel_dropout(train.dead, rows.numel(), args.channel_dropout, gen)  # dead + dropped live sensors
        with autocast(device, args.precision):
            pred = ddp(train.x[rows], mask, train.prior_rows(rows))
        return (pred.float() - train.z[rows]).square().mean()

    def validate_regression(model):
        z = predict(model, val, info, args.precision)
        return {"val_loss": float((z - val.z).square().mean()),
                **{f"val_mse_{n}": float((z[:, k] - val.z[:, k]).square().mean()) for k, n in enumerate(TARGET_NAMES)}}

    torch.manual_seed(args.seed + 2)  # the same head init for fine-tune and scratch
    prior = args.prior == "classical"
    model = (MapRegressor(encoder, geometry, train.mean[:2], train.std[:2], prior=prior) if args.head == "maps"
             else TokenRegressor(encoder, prior=prior)).to(device)
    scale = args.encoder_lr_scale if name.endswith("finetune") else 1.0
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    groups = [{"params": list(model.encoder.parameters()), "lr_scale": scale},
              {"params": [p for p in model.parameters() if id(p) not in encoder_ids], "lr_scale": 1.0}]
    ema = EMA(model, decay=args.ema, warmup=args.ema_warmup == "on")
    stage = train_stage(name, model, train, args.epochs if epochs is None else epochs, args.lr, args.weight_decay,
                        regression_loss, validate_regression, args, info, run, ema=ema, steps_before=steps_before,
                        groups=groups)
    stage["ema_decay_last_step"] = ema.decay_at(stage["opt_steps"])
    return stage, (predict(ema.module, test, info, args.precision) * train.std + train.mean).cpu()


def label_study(args, info, run: RunDir, kw: dict, say) -> None:
    """``--study labels``: per seed one FCMAE pretraining on ``--train-events`` unlabelled events, then per label
    budget the fine-tuned and the from-scratch regressor, ``--study-steps`` optimizer steps each, scored on that
    seed's test events; the table gives the median [IQR] over the seeds of each target's test RMSE."""
    budgets = [int(b) for b in args.label_budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if max(budgets) > args.train_events or min(budgets) < args.batch_size:
        raise ValueError(f"--label-budgets: expected values in [--batch-size, --train-events] = "
                         f"[{args.batch_size}, {args.train_events}], got {budgets}")
    device, arms = info.device, ("classical", "finetune", "scratch")
    rmse = torch.full((len(seeds), len(budgets), len(arms), len(TARGET_NAMES)), math.nan, dtype=torch.float64)
    stages, done, t0 = {}, 0, time.perf_counter()
    for i, seed in enumerate(seeds):
        sargs = copy.copy(args)
        sargs.seed = seed
        seed_everything(seed)
        geometry = build_geometry()
        unlabeled = Split(args.train_events, geometry, seed=3 * seed + 1).to(device)
        val = Split(args.val_events, geometry, 3 * seed + 2).to(device)
        test = Split(args.test_events, geometry, 3 * seed + 3).to(device)
        geometry = geometry.to(device)
        mae, stages[f"s{seed}/pretrain"] = pretrain_stage(f"s{seed}/pretrain", unlabeled, val, geometry, kw, sargs,
                                                          info, run, steps_before=done)
        done += stages[f"s{seed}/pretrain"]["opt_steps"]
        for j, n in enumerate(budgets):
            train = unlabeled.head(n)
            classical = label(train, val, test, geometry, sargs)
            rmse[i, j, 0] = torch.tensor([r["rmse"] for r in resolution(classical.predict(test.events),
                                                                        test.targets.cpu()).values()])
            epochs = max(1, round(args.study_steps / max(1, (n // args.batch_size) // args.accum)))
            for k, arm in enumerate(arms[1:], 1):
                name = f"s{seed}/n{n}/{arm}"
                torch.manual_seed(seed + 2)
                encoder = copy.deepcopy(mae.encoder) if arm == "finetune" else XECEncoder(geometry, **kw)
                stages[name], pred = regress(name, encoder, train, val, test, geometry, sargs, info, run,
                                             steps_before=done, epochs=epochs)
                done += stages[name]["opt_steps"]
                rmse[i, j, k] = torch.tensor([r["rmse"] for r in resolution(pred, test.targets).values()])
            say(f"seed {seed}, {n} labels ({epochs} epochs): test RMSE finetune "
                f"{[round(float(v), 3) for v in rmse[i, j, 1]]}, scratch {[round(float(v), 3) for v in rmse[i, j, 2]]}"
                f" ({time.perf_counter() - t0:.0f} s)")
    if info.is_main:
        q = rmse.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=0)  # (3, budgets, arms, targets)
        lines = [f"label-budget sweep: test RMSE, median [IQR] over seeds {seeds}; {args.train_events} unlabelled "
                 f"events, {args.study_steps} optimizer steps per regression", "labels  target  " + "".join(
                     f"{a:>26}" for a in arms) + "  pretrained wins"]
        for j, n in enumerate(budgets):
            for t, target in enumerate(TARGET_NAMES):
                cells = [f"{q[1, j, k, t]:.3g} [{q[0, j, k, t]:.3g}, {q[2, j, k, t]:.3g}]" for k in range(len(arms))]
                wins = int((rmse[:, j, 1, t] < rmse[:, j, 2, t]).sum())
                lines.append(f"{n:<8}{target:<8}" + "".join(f"{c:>26}" for c in cells) + f"  {wins}/{len(seeds)}")
        table = "\n".join(lines)
        print("\n" + table)
        summary = {"study": "labels", "budgets": budgets, "seeds": seeds, "arms": list(arms),
                   "targets": list(TARGET_NAMES), "rmse": rmse.tolist(), "stages": stages, "table": table,
                   "wall_time_s": time.perf_counter() - t0}
        print(f"\nwrote {run.write_json('summary.json', summary)}")
    run.finish()
    teardown_distributed()


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup_distributed()
    run = RunDir(args.out, run_config(args), resume=args.resume, overwrite=args.overwrite)
    device, is_main = info.device, info.is_main
    say = main_print(is_main)
    seed_everything(args.seed)
    run_start = time.perf_counter()
    kw = {"dim": args.dim, "depth": args.depth, "token_dim": args.token_dim, "hex_dim": max(8, args.token_dim // 2),
          "pos_enc": args.pos_enc}
    if args.study == "labels":
        return label_study(args, info, run, kw, say)

    # --- data: every rank generates the same events in memory (disjoint seeds per split) ----------
    geometry = build_geometry()
    t0 = time.perf_counter()
    unlabeled = Split(args.train_events, geometry, seed=3 * args.seed + 1)  # the MAE needs no labels
    train = unlabeled if args.labeled is None else unlabeled.head(args.labeled)  # regression: labelled part
    val = Split(args.val_events, geometry, 3 * args.seed + 2)
    test = Split(args.test_events, geometry, 3 * args.seed + 3)
    for split in {id(part): part for part in (unlabeled, train, val, test)}.values():
        split.to(device)
    classical = label(train, val, test, geometry, args)
    say(f"events: train {unlabeled.n} ({train.n} labelled), val {val.n}, test {test.n} generated in "
        f"{time.perf_counter() - t0:.1f} s; {int(train.dead.sum())} dead sensors; world {info.world_size} on "
        f"{device}, {args.precision}")
    geometry = geometry.to(device)

    # --- stage 1: FCMAE pretraining -----------------------------------------------------------------
    mae, stage = pretrain_stage("pretrain", unlabeled, val, geometry, kw, args, info, run)
    stages = {"pretrain": stage}
    say(f"pretrain: {stages['pretrain']['parameters']:,} parameters, val masked MSE "
        f"{stages['pretrain']['final']['val_loss'] if is_main else 0:.5f}")
    # --- stages 2 and 3: fine-tune from the pretrained encoder, and from scratch --------------------
    results, predictions = {}, {}
    for name in ("finetune", "scratch") if args.scratch == "on" else ("finetune",):
        torch.manual_seed(args.seed + 2)
        encoder = copy.deepcopy(mae.encoder) if name == "finetune" else XECEncoder(geometry, **kw)
        stages[name], predictions[name] = regress(name, encoder, train, val, test, geometry, args, info, run,
                                                  steps_before=sum(stage["opt_steps"] for stage in stages.values()))
        results[name] = resolution(predictions[name], test.targets)
        say(f"{name}: {stages[name]['parameters']:,} parameters, best epoch {stages[name]['best_epoch']}, "
            f"{stages[name]['train_time_s']:.0f} s")

    # --- stage 4: inpainting heads on the frozen pretrained encoder -----------------------------------
    inpainting = {}
    if args.inpaint == "on":
        torch.manual_seed(args.seed + 3)
        inpainter = XECInpainter(copy.deepcopy(mae.encoder), geometry, hidden=args.inpaint_hidden).to(device)
        val_masks = inpaint_masks(val.n, val.dead, args.inpaint_mask_ratio, 20_000 + args.seed, device)
        # --inpaint-dead-targets on: the alive twins of the training and validation events (simulation),
        # where the dead map's sensors are hidden in every event and are targets like the randomly hidden live sensors
        cpu_geometry = geometry.to("cpu")
        on = args.inpaint_dead_targets == "on"
        dead_targets = unlabeled.dead if on else torch.zeros_like(unlabeled.dead)
        train_x, val_x = ((split.alive_inputs(cpu_geometry).to(device) if on else split.x)
                          for split in (unlabeled, val))
        # the heads start as the better blend of the two classical fill-ins per face and channel, fitted on the
        # training events under masks like the training's (the same on every rank)
        calib = inpaint_masks(unlabeled.n, unlabeled.dead, args.inpaint_mask_ratio, 10_000 + args.seed, device)
        blend = inpainter.calibrate(train_x, calib | unlabeled.dead, calib | dead_targets)
        say("inpaint: face-mean weight of the fill-in (npho, time): "
            + ", ".join(f"{face} {a:.2f} {b:.2f}" for face, (a, b) in zip(FACE_NAMES, blend.tolist())))

        def inpaint_step(ddp, rows, gen):
            hidden = random_mask(rows.numel(), unlabeled.dead.numel(), args.inpaint_mask_ratio,
                                 valid=~unlabeled.dead.expand(rows.numel(), -1).cpu(), generator=gen).to(device)
            batch = masked_batch(train_x[rows], hidden | unlabeled.dead, hidden | dead_targets)  # inputs zeroed
            with autocast(device, args.precision):
                out = ddp(batch.x, batch.mask, batch.targets)
            return inpaint_loss(out, batch.truth, batch.scored).total

        def validate_inpaint(model):
            sums = score_inpainting(model, val_x, val_masks | val.dead, val_masks | dead_targets, info, args)
            ratio = sums[:, 0, :, 1].sum(0) / sums[:, 1, :, 1].sum(0)  # model / neighbour-average MSE
            return {"val_loss": float(ratio.sum()), "val_npho_mse_vs_neighbours": float(ratio[0]),
                    "val_time_mse_vs_neighbours": float(ratio[1])}

        stages["inpaint"] = train_stage("inpaint", inpainter, unlabeled, args.inpaint_epochs, args.inpaint_lr, 1e-4,
                                        inpaint_step, validate_inpaint, args, info, run,
                                        steps_before=sum(stage["opt_steps"] for stage in stages.values()))
        # test (a): random masks of the live sensors; (b) the detector's dead-channel map, on the test events'
        # alive twins (the truth behind a dead channel is known only in simulation)
        hidden = inpaint_masks(test.n, test.dead, args.inpaint_mask_ratio, 30_000 + args.seed, device)
        dead_map = test.dead.expand(test.n, -1)
        cases = {"random": (test.x, hidden | test.dead, hidden),
                 "dead_map": (test.alive_inputs(cpu_geometry).to(device), dead_map, dead_map)}
        # the noise floor: the expectation from the true source, which no method sees
        events = test.events
        expected = expected_truth(events.source, events.targets[:, 3], events.targets[:, 4], cpu_geometry).to(device)
        for case, (x, mask, targets) in cases.items():
            inpainting[case] = summarise(score_inpainting(inpainter, x, mask, targets, info, args, expected))
        say(f"inpaint: {stages['inpaint']['parameters']:,} trained parameters (the encoder is frozen), "
            f"{stages['inpaint']['train_time_s']:.0f} s")

    # --- report -------------------------------------------------------------------------------------
    results = {"train mean": resolution(train.mean.expand(test.n, -1), test.targets),
               "classical": resolution(classical.predict(test.events), test.targets.cpu()), **results}
    if is_main:
        names = list(results)
        header = f"{'target':<14}" + "".join(f"{n:>22}" for n in names)
        lines = [f"test resolution, RMSE / 68% half-width of |residual| ({test.n} events, lower is better)",
                 header, "-" * len(header)]
        for t in TARGET_NAMES:
            cells = [f"{results[n][t]['rmse']:.3g} / {results[n][t]['res68']:.3g}" for n in names]
            lines.append(f"{t + ' [' + UNITS[t] + ']':<14}" + "".join(f"{c:>22}" for c in cells))
        has = [t for t in TARGET_NAMES if not math.isnan(results["classical"][t]["rmse"])]
        for name in ("finetune", "scratch") if args.scratch == "on" else ("finetune",):
            wins = [t for t in has if results[name][t]["rmse"] < results["classical"][t]["rmse"]]
            lines.append(f"{name} beats classical (test RMSE) on {len(wins)}/{len(has)}: {', '.join(wins) or 'none'}")
        better = [t for t in TARGET_NAMES if args.scratch == "on"
                  and results["finetune"][t]["rmse"] < results["scratch"][t]["rmse"]]
        lines.append(f"fine-tuned beats scratch (test RMSE) on {len(better)}/5 targets: {', '.join(better) or 'none'}")
        pre = stages["pretrain"]["final"]
        lines.append(f"\npretraining: val masked MSE {pre['val_loss']:.5f} (per-sensor training mean "
                     f"{pre['val_sensor_mean_mse']:.5f}); fine-tune vs scratch val loss (EMA, standardised MSE): "
                     f"{stages['finetune']['final']['val_loss']:.4f} vs "
                     f"{stages['scratch']['final']['val_loss'] if args.scratch == 'on' else math.nan:.4f}")
        lines.append(f"head {args.head}, prior {args.prior}")
        lines.append(f"positional encoding of the face tokens: {args.pos_enc}; EMA decay {args.ema}, warmup "
                     f"{args.ema_warmup}: effective decay at the last step ({stages['finetune']['opt_steps']}) "
                     f"{stages['finetune']['ema_decay_last_step']:.4f}")
        table = "\n".join(lines)
        print("\n" + table)
        wall = time.perf_counter() - run_start
        summary = {"world_size": info.world_size, "device": str(device),
                   "events": {"train": unlabeled.n, "labeled": train.n, "val": val.n, "test": test.n},
                   "per_rank_batch": per_rank_batch(args.batch_size, info.world_size),
                   "stages": stages, "results": results, "finetune_better_than_scratch": better, "table": table,
                   "wall_time_s": wall}
        predictions["classical"] = classical.predict(test.events)
        if plot_predictions(predictions, test.targets.cpu(), run.file("predictions.png")):
            summary["plots"] = ["predictions.png"]
        if inpainting:
            summary["inpainting"] = {"mask_ratio": args.inpaint_mask_ratio, "dead_channels": int(test.dead.sum()),
                                     **inpainting}
            titles = {"random": f"random masks ({args.inpaint_mask_ratio:.0%} of the live sensors)",
                      "dead_map": f"the detector's dead-channel map ({int(test.dead.sum())} sensors)"}
            for case, (x, mask, targets) in cases.items():
                text, wins = format_table(inpainting[case], f"\ninpainting on {test.n} test events, {titles[case]}")
                print(text + f"\ninpainting beats both baselines (RMSE) on {len(wins)}: {', '.join(wins) or 'none'}")
                summary["inpainting"][f"{case}_table"], summary["inpainting"][f"{case}_wins"] = text, wins
                plt = pyplot()
                if plt is not None:  # the first test event
                    batch = masked_batch(x[:1], mask[:1], targets[:1])
                    _, preds = evaluate_batch(inpainter, batch)
                    summary.setdefault("plots", []).extend(plot_face_maps(
                        plt, geometry, batch.truth[0, :, 0], batch.mask[0], preds[0][0, :, 0], preds[1][0, :, 0],
                        run.file, f"inpaint_{case.split('_')[0]}"))
        print(f"\nwrote {run.write_json('summary.json', summary)} (wall time {wall:.0f} s)")
    run.finish()
    teardown_distributed()


def plot_predictions(predictions: dict, true: torch.Tensor, path: Path) -> bool:
    """Predicted vs true on the test split, one panel per target; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(TARGET_NAMES), figsize=(4 * len(TARGET_NAMES), 4))
    for k, (ax, t) in enumerate(zip(axes, TARGET_NAMES)):
        for name, pred in predictions.items():
            if not torch.isnan(pred[:, k]).all():
                ax.scatter(true[:, k], pred[:, k], s=3, alpha=0.4, label=name)
        lo, hi = float(true[:, k].min()), float(true[:, k].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"true {t} [{UNITS[t]}]")
        ax.set_ylabel(f"predicted {t}")
    axes[0].legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
