"""Helpers of ``benchmarks/trajectory.py`` for real model sizes: the storage-dtype check of ``dtype="auto"``.

``dtype_check`` trains the digits CNN (``digits_cnn(channels)``) at several widths with plain SGD,
records every optimizer step's weights in float32, and computes the trajectory PCA of the same path
stored as float32, float16 and bfloat16: the change of the explained-variance ratios of PC1 and PC2
is what 16-bit storage costs the figure. ``SnapshotStore(dtype="auto")`` stores float16 from the
parameter count where that change stays below 1e-3.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Channels of ``digits_cnn`` and the parameter counts they give (trainable weights, BatchNorm included).
SIZES = {"5k": 16, "1M": 320, "10M": 1050}
EVR_TOLERANCE = 1e-3


def digits_path(channels: int, epochs: int, lr: float, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The weights after every SGD step (momentum 0.9, batch 64) of ``digits_cnn(channels)``, as a K x P float32 tensor.

    Row 0 is the initial weights; the last row is the final weights. Also returns the final parameters.
    """
    from torch.nn import functional as F

    from examples.digits import digits_cnn, load_digits_tensors

    torch.manual_seed(seed)
    x, y = load_digits_tensors()
    model = digits_cnn(channels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    steps_per_epoch = (len(x) + 63) // 64
    rows = torch.empty(epochs * steps_per_epoch + 1, sum(p.numel() for p in params))
    gen = torch.Generator().manual_seed(seed)

    def record(k: int) -> None:
        torch.cat([p.detach().reshape(-1) for p in params], out=rows[k])

    record(0)
    k = 1
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            record(k)
            k += 1
    return rows, params


def evr_by_dtype(rows: torch.Tensor, final: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Explained-variance ratios of PC1, PC2 of the path ``rows`` stored in each storage dtype."""
    from lightning_landscape.trajectory import SnapshotStore, trajectory_pca

    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        store = SnapshotStore(rows.shape[1], dtype=dtype, storage="memory")
        for k, row in enumerate(rows[:-1]):  # the final weights come from the parameters, as in the callback
            store.append(row, step=k, epoch=0)
        out[dtype] = np.asarray(trajectory_pca(store, final, 2).explained_variance_ratio, dtype=np.float64)
        store.close()
    return out


def dtype_check(sizes: list[str], epochs: int, lrs: list[float]) -> list[dict]:
    """One row per (size, lr, sampling): |ΔEVR| of float16 and bfloat16 storage against float32."""
    results = []
    for size in sizes:
        for lr in lrs:
            t0 = time.perf_counter()
            rows, final = digits_path(SIZES[size], epochs, lr)
            steps_per_epoch = (rows.shape[0] - 1) // epochs
            for sampling, picked in (
                ("every step", rows),
                ("every epoch", rows[::steps_per_epoch]),
            ):
                evr = evr_by_dtype(picked, final)
                results.append(
                    {
                        "size": size,
                        "num_params": rows.shape[1],
                        "lr": lr,
                        "sampling": sampling,
                        "snapshots": picked.shape[0],
                        "evr32": evr["float32"].tolist(),
                        "d16": float(np.abs(evr["float16"] - evr["float32"]).max()),
                        "dbf16": float(np.abs(evr["bfloat16"] - evr["float32"]).max()),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(results[-1], flush=True)
            del rows
    return results


def print_dtype_table(results: list[dict]) -> None:
    """The markdown table of :func:`dtype_check`."""
    print("\n## Explained variance of PC1/PC2: 16-bit storage against float32 (the same path, max over PC1, PC2)\n")
    print("| model | parameters | lr | snapshots | EVR (float32) | abs. change float16 | abs. change bfloat16 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        evr = ", ".join(f"{v:.4f}" for v in r["evr32"])
        print(
            f"| digits_cnn({SIZES[r['size']]}) | {r['num_params']:,} | {r['lr']} | {r['snapshots']} ({r['sampling']}) "
            f"| {evr} | {r['d16']:.1e} | {r['dbf16']:.1e} |"
        )
    worst16 = max(r["d16"] for r in results)
    worstbf = max(r["dbf16"] for r in results)
    print(
        f"\nworst change: float16 {worst16:.1e}, bfloat16 {worstbf:.1e} (tolerance {EVR_TOLERANCE:.0e}): "
        f"float16 {'within' if worst16 < EVR_TOLERANCE else 'OUTSIDE'}, "
        f"bfloat16 {'within' if worstbf < EVR_TOLERANCE else 'OUTSIDE'}"
    )


# --------------------------------------------------------------------------------------------
# training slowdown at real sizes

#: name -> (architecture, width, epochs, training samples): MLPs (64 -> w -> w -> 10, the fewest FLOPs per
#: weight, so the harshest case for a per-step snapshot) and the digits CNN widened, as in issue 17.
MODELS = {
    "cnn-5k": ("cnn", 16, 5, None),
    "mlp-1M": ("mlp", 950, 6, None),
    "mlp-10M": ("mlp", 3100, 2, None),
    "cnn-1M": ("cnn", 320, 2, 640),
    "cnn-10M": ("cnn", 1050, 2, 384),
}
TARGETS = {"step": 0.03, "epoch": 0.005}
HOOKS = ("on_train_batch_end", "on_train_epoch_end", "on_before_optimizer_step", "on_validation_start", "on_train_end")
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time, "process": time.process_time}


def sized_module(name: str):
    """A LightningModule of ``MODELS[name]``: SGD (lr 0.05, momentum 0.9), cross-entropy on the digits."""
    import pytorch_lightning as pl
    from torch import nn
    from torch.nn import functional as F

    from examples.digits import digits_cnn

    kind, width = MODELS[name][:2]
    net = (
        digits_cnn(width)
        if kind == "cnn"
        else nn.Sequential(
            nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )
    )

    class Sized(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Sized()


def fit_sized(name: str, epochs: int, callbacks: list, tmp: str):
    """Seed, then fit ``sized_module(name)`` on the digits (batch 64) on one CPU process, no logger or checkpoints."""
    import pytorch_lightning as pl

    from examples.digits import DigitsDataModule

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp,
    )
    trainer.fit(sized_module(name), datamodule=DigitsDataModule(batch_size=64, num_train=MODELS[name][3]))
    return trainer


def _timed(trajectory, calls: dict[str, list[float]]) -> None:
    """Wrap the callback's hooks: the training thread's CPU time of every call, per hook."""
    for hook in HOOKS:
        original = getattr(trajectory, hook)
        calls[hook] = []

        def timed(*args, _original=original, _calls=calls[hook], **kwargs):
            c = time.thread_time()
            try:
                return _original(*args, **kwargs)
            finally:
                _calls.append(time.thread_time() - c)

        setattr(trajectory, hook, timed)


def train_once(name: str, variant: str, tmp: str, epochs: int | None = None) -> dict:
    """One fit: training time on three clocks, the snapshot hooks' call times, the store's dtype and storage."""
    from pytorch_lightning.callbacks import Callback

    from lightning_landscape import TrajectoryPCA

    class TrainTimer(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.start = {k: clock() for k, clock in CLOCKS.items()}

        def on_train_end(self, trainer, pl_module) -> None:
            self.seconds = {k: clock() - self.start[k] for k, clock in CLOCKS.items()}

    class StoreFacts(Callback):  # after the trajectory's fit end: its store is still open
        def on_fit_end(self, trainer, pl_module) -> None:
            store = trajectory.store if trajectory is not None else None
            self.facts = {} if store is None else {"dtype": store.dtype, "storage": store.storage, "k": len(store)}

    timer, facts = TrainTimer(), StoreFacts()
    calls: dict[str, list[float]] = {}
    trajectory = None
    if variant != "none":
        every = {"every_n_steps": 1} if variant == "step" else {"every_n_epochs": 1}
        # Default storage ("auto", 1024 MiB, then disk) and dtype ("auto"); the fit-end analysis (3x3 grid on
        # one batch) is not timed.
        trajectory = TrajectoryPCA(**every, resolution=3, num_batches=1, dirpath=tmp, progress=False)
        _timed(trajectory, calls)
    trainer = fit_sized(name, epochs or MODELS[name][2], [timer, *([trajectory] if trajectory else []), facts], tmp)
    return {"train": timer.seconds, "calls": calls, "steps": trainer.global_step, **facts.facts}


def training_benchmark(names: list[str], repeats: int) -> dict[str, dict[str, list[dict]]]:
    """Per model: plain, every-step and every-epoch fits, interleaved with the order rotated, after a warm-up."""
    import tempfile

    variants = ["none", "step", "epoch"]
    out: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for v in variants:  # warm-up: first-call allocations, data loading
                train_once(name, v, tmp, epochs=1)
            for r in range(repeats):
                for v in variants[r % 3 :] + variants[: r % 3]:  # no variant always runs first
                    runs[v].append(train_once(name, v, tmp))
            out[name] = runs
            print(f"[{name} done]", file=sys.stderr, flush=True)
    return out


def print_training_table(runs: dict[str, dict[str, list[dict]]]) -> None:
    """One markdown row per model and schedule: slowdowns (paired, medians over repeats) and hook times."""
    print(
        "| model | parameters | plain step, CPU (ms) | TrajectoryPCA | stored as | snapshot, CPU (ms) "
        "| hooks, CPU share | paired slowdown: wall | paired: training-thread CPU | paired: process CPU "
        "| fastest run / fastest plain run: wall | target | met (hooks) | met (wall) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, by_variant in runs.items():
        base = {c: np.array([r["train"][c] for r in by_variant["none"]]) for c in CLOCKS}
        steps = by_variant["none"][0]["steps"]
        params = sum(p.numel() for p in sized_module(name).parameters())
        for variant, label, hook in (
            ("step", "every_n_steps=1", "on_train_batch_end"),
            ("epoch", "every_n_epochs=1", "on_train_epoch_end"),
        ):
            rs = by_variant[variant]
            paired = {c: np.median(np.array([r["train"][c] for r in rs]) / base[c] - 1) for c in CLOCKS}
            # The minimum over repeats: what a run costs when the machine does not slow it down (noise
            # on a shared machine only adds time), an estimate less spread than the paired median.
            fastest = min(r["train"]["wall"] for r in rs) / base["wall"].min() - 1
            share = float(np.median([sum(sum(v) for v in r["calls"].values()) / r["train"]["cpu"] for r in rs]))
            per_call = np.median(
                [np.median(r["calls"][hook]) if variant == "step" else max(r["calls"][hook]) for r in rs]
            )
            target = TARGETS[variant]
            print(
                f"| {name} | {params:,} | {1e3 * np.median(base['cpu']) / steps:.1f} | {label} "
                f"| {rs[0].get('dtype')}, {rs[0].get('storage')} ({rs[0].get('k')} snapshots) | {1e3 * per_call:.2f} "
                f"| {100 * share:.2f} % | {100 * paired['wall']:+.2f} % | {100 * paired['cpu']:+.2f} % "
                f"| {100 * paired['process']:+.2f} % | {100 * fastest:+.2f} % | <= {100 * target:g} % | {'yes' if share <= target else 'no'} "
                f"| {'yes' if paired['wall'] <= target else 'no'} |"
            )
    for name, by_variant in runs.items():
        for clock in ("wall", "cpu"):
            t = np.array([r["train"][clock] for r in by_variant["none"]])
            spread = (np.percentile(t, 75) - np.percentile(t, 25)) / np.median(t)
            print(
                f"{name}: plain runs' {clock} spread (IQR / median) {100 * spread:.1f} %, median {np.median(t):.2f} s"
            )


# --------------------------------------------------------------------------------------------
# marginal cost of a snapshot, within one run

#: Steps per block of the alternating runs: snapshots in even blocks, none in odd ones.
BLOCK = 4
#: The alternating runs' TrajectoryPCA settings: default storage ("auto": memory rows here) with the copy
#: overlapped (the default) or synchronous, and disk storage (two reused buffers, written by the writer thread).
MARGINAL_VARIANTS = {
    "memory, overlapped": {"overlap_copy": True},
    "memory, synchronous": {"overlap_copy": False},
    "disk, overlapped": {"storage": "disk"},
}


def block_of(step: int, counted: bool = False) -> str | None:
    """``"on"`` if optimizer step ``step`` (0-based) takes a snapshot in the alternating runs, else ``"off"``.

    With ``counted``, ``None`` for the first step of each block, which is not counted: it carries the
    block before it (the previous step's deferred copy runs during it).
    """
    if counted and step % BLOCK == 0:
        return None
    return "on" if (step // BLOCK) % 2 == 0 else "off"


def alternating_fit(name: str, tmp: str, epochs: int, settings: dict) -> tuple[list[float], dict, int]:
    """One fit with ``TrajectoryPCA(every_n_steps=1)`` whose snapshots are on in every other block of ``BLOCK`` steps.

    Returns, per cycle (an on block and the off block after it), the ratio of the median step
    time with snapshots to that without, less one; the median wall and training-thread CPU time
    of steps with and without (in a VM, CPU time leaves out time the host took, e.g. to back
    fresh pages); the steps per epoch. A
    step is timed from one ``on_train_batch_start`` to the next (validation and epoch ends are not
    in any step). The first step of each block is dropped: it carries the block before it (a
    snapshot's deferred copy runs during the next step), so every step counted "on" pays for
    exactly one snapshot (its own, and the copy of the one before) and every step counted "off" for none.
    """
    from pytorch_lightning.callbacks import Callback

    from lightning_landscape import TrajectoryPCA

    times: dict[int, float] = {}
    cpu: dict[int, float] = {}

    class StepTimer(Callback):
        last: tuple[float, float] | None = None

        def on_train_batch_start(self, trainer, *args) -> None:
            now = time.perf_counter(), time.thread_time()
            if self.last is not None:
                times[trainer.global_step - 1] = now[0] - self.last[0]
                cpu[trainer.global_step - 1] = now[1] - self.last[1]
            self.last = now

        def on_train_epoch_start(self, *args) -> None:
            self.last = None

        def on_validation_start(self, *args) -> None:
            self.last = None

    trajectory = TrajectoryPCA(every_n_steps=1, resolution=3, num_batches=1, dirpath=tmp, progress=False, **settings)
    hook = trajectory.on_train_batch_end

    def gated(trainer, *args, **kwargs):  # step s ends with global_step s + 1
        if block_of(trainer.global_step - 1) != "off":
            hook(trainer, *args, **kwargs)

    trajectory.on_train_batch_end = gated
    trainer = fit_sized(name, epochs, [StepTimer(), trajectory], tmp)
    cycles: dict[int, dict[str, list[float]]] = {}
    for step, t in times.items():
        if (kind := block_of(step, counted=True)) is not None:
            cycles.setdefault(step // (2 * BLOCK), {"on": [], "off": []})[kind].append(t)
    full = [c for c in cycles.values() if len(c["on"]) == len(c["off"]) == BLOCK - 1]
    ratios = [float(np.median(c["on"]) / np.median(c["off"]) - 1) for c in full]
    medians = {
        f"{kind} {clock}": float(np.median([t[s] for s in t if block_of(s, counted=True) == kind]))
        for kind in ("on", "off")
        for clock, t in (("wall", times), ("cpu", cpu))
    }
    return ratios, medians, trainer.num_training_batches


def marginal_benchmark(names: list[str], repeats: int, epochs: int) -> list[dict]:
    """Per model and ``MARGINAL_VARIANTS`` entry: the cycles of ``repeats`` alternating fits, the variants interleaved."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            got = {v: {"ratios": [], "medians": [], "per_epoch": 0} for v in MARGINAL_VARIANTS}
            for settings in MARGINAL_VARIANTS.values():  # warm-up
                alternating_fit(name, tmp, 1, settings)
            order = list(MARGINAL_VARIANTS)
            for r in range(repeats):
                for variant in order[r % len(order) :] + order[: r % len(order)]:
                    ratios, medians, per_epoch = alternating_fit(name, tmp, epochs, MARGINAL_VARIANTS[variant])
                    got[variant]["ratios"] += ratios
                    got[variant]["medians"].append(medians)
                    got[variant]["per_epoch"] = per_epoch
            rows += [{"name": name, "variant": v, **g} for v, g in got.items()]
            print(f"[{name} done]", file=sys.stderr, flush=True)
    return rows


def print_marginal_table(rows: list[dict]) -> None:
    """Markdown: a snapshot's cost per step (median over cycles, bootstrap 95 % interval) and per epoch."""
    print(
        "| model | storage, copy | cycles | step without / with snapshots: wall (ms) | same: training-thread CPU (ms) "
        "| every step: slowdown (95 % CI) | met (<= 3 %) | every epoch: one snapshot / epoch | met (<= 0.5 %) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        x = np.array(r["ratios"])
        boot = np.median(np.random.default_rng(0).choice(x, (2000, len(x))), axis=1)
        lo, hi, med = np.percentile(boot, 2.5), np.percentile(boot, 97.5), float(np.median(x))
        m = {k: 1e3 * np.median([d[k] for d in r["medians"]]) for k in r["medians"][0]}
        # An epoch-end snapshot is copied before training goes on: its share of an epoch (validation not
        # counted, so an upper bound), from the synchronous rows.
        sync = "synchronous" in r["variant"]
        epoch = med / r["per_epoch"]
        print(
            f"| {r['name']} | {r['variant']} | {len(x)} | {m['off wall']:.1f} / {m['on wall']:.1f} "
            f"| {m['off cpu']:.1f} / {m['on cpu']:.1f} | {100 * med:+.2f} % ({100 * lo:+.2f} .. {100 * hi:+.2f}) "
            f"| {'yes' if med <= TARGETS['step'] else 'no'} | {f'{100 * epoch:+.3f} %' if sync else ''} "
            f"| {('yes' if epoch <= TARGETS['epoch'] else 'no') if sync else ''} |"
        )
