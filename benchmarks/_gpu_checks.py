"""The checks of ``benchmarks/gpu_check.py``: each takes a device and returns
``(status, detail)``, raises :class:`Skip`, or raises (an ``AssertionError`` names what
differed). Public gradguard API only."""

from __future__ import annotations

import copy
import math
import os
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard as gg

sys.path.insert(0, str(Path(__file__).parent))

from _state import assert_same

PASS, INFO = "pass", "info"
SYNC_TEXT = "called a synchronizing CUDA operation"  # torch's sync debug message


class Skip(Exception):
    """The check does not apply here (no CUDA, one GPU)."""


# -- small pieces --------------------------------------------------------------------------


def _require_cuda(device: str, gpus: int = 1) -> None:
    """Skip unless on CUDA with ``gpus`` devices (the sync counts need CUDA's debug mode)."""
    if device != "cuda":
        raise Skip("needs CUDA")
    if torch.cuda.device_count() < gpus:
        raise Skip(f"needs {gpus} GPUs, found {torch.cuda.device_count()}")


def _wait(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _mlp(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)
    )
    return model.to(device=device, dtype=dtype)


def _data(device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=gen).to(device=device, dtype=dtype)
    return x, torch.randint(0, 10, (32,), generator=gen).to(device)


def _backward(model: nn.Module, optimizer, x, y, scaler=None) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, torch.float16, enabled=scaler is not None):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss


def _adamw(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    if fused:
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)


def _sync_sites(fn: Callable[[], Any]) -> list[str]:
    """Run ``fn`` with CUDA sync debugging on ``warn``; where each sync happened."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [
        f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if SYNC_TEXT in str(w.message)
    ]


def _calibrate(device: str) -> None:
    """The counting sees a known sync (else every zero below would mean nothing)."""
    seen = _sync_sites(lambda: torch.ones(1, device=device).item())
    assert len(seen) == 1, f"sync debug mode reported {len(seen)} syncs for one .item()"


def _no_sync(fn: Callable[[], Any]) -> None:
    """Run ``fn`` with sync debugging on ``error``; name gradguard's line if it syncs."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as error:
        if SYNC_TEXT not in str(error):
            raise
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "gradguard" in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        raise AssertionError(f"a host sync in sync_debug_mode('error'){where}") from error
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _guard_syncs(device: str, policy: gg.Policy | None, fused: bool, steps: int = 10):
    """Sync sites of ``steps`` steady-state ``guard.step`` calls and of as many bare steps."""
    _calibrate(device)
    model, (x, y) = _mlp(device), _data(device)
    optimizer = _adamw(model, fused)
    # host_math=False: on a CUDA device it changes nothing; on the CPU (the tests) it keeps
    # the device path, whose syncs these checks count, instead of reading norms on the host.
    guard = gg.Guard(model, policy, health=False, host_math=False)
    for _ in range(3):  # optimizer state, caches, lazy inits
        _backward(model, optimizer, x, y)
        guard.step(optimizer)
    _wait(device)
    guarded, bare = [], []
    for _ in range(steps):
        _backward(model, optimizer, x, y)
        guarded += _sync_sites(lambda: guard.step(optimizer))
    for _ in range(steps):
        _backward(model, optimizer, x, y)
        bare += _sync_sites(optimizer.step)
    for _ in range(3):
        _backward(model, optimizer, x, y)
        if not guarded:
            _no_sync(lambda: guard.step(optimizer))
    return guarded, bare


def _sites(found: list[str]) -> str:
    return ", ".join(sorted(set(found))) or "none"


# -- the checks ----------------------------------------------------------------------------


def sync_default_fused(device: str) -> tuple[str, str]:
    _require_cuda(device)
    guarded, _ = _guard_syncs(device, None, fused=True)
    assert not guarded, f"{len(guarded)} syncs in 10 steps at {_sites(guarded)}"
    return PASS, "0 syncs per guard.step (default policy, fused AdamW; also in 'error' mode)"


def sync_skip_fused(device: str) -> tuple[str, str]:
    _require_cuda(device)
    guarded, _ = _guard_syncs(device, gg.chain(gg.SkipSpike(), gg.ClipNorm(1.0)), fused=True)
    assert not guarded, f"{len(guarded)} syncs in 10 steps at {_sites(guarded)}"
    return PASS, "0 syncs per guard.step (SkipSpike + ClipNorm, fused AdamW: skip folded)"


def sync_skip_unfused(device: str) -> tuple[str, str]:
    _require_cuda(device)
    steps = 10
    guarded, bare = _guard_syncs(device, None, fused=False, steps=steps)
    extra = (len(guarded) - len(bare)) / steps
    detail = f"{extra:g} per step over the bare step's {len(bare) / steps:g} ({_sites(guarded)})"
    assert extra <= 1, f"more than the one allowed sync (reading the skip flag): {detail}"
    return PASS, f"<= 1 sync allowed (default policy, foreach AdamW): {detail}"


def recording(device: str) -> tuple[str, str]:
    _require_cuda(device)
    _calibrate(device)
    log_every, steps = 5, 20
    model, (x, y) = _mlp(device), _data(device)
    optimizer = _adamw(model, fused=True)
    with tempfile.TemporaryDirectory() as tmp:
        guard = gg.Guard(
            model, gg.ClipNorm(1.0), store=Path(tmp) / "run", log_every=log_every, host_math=False
        )
        results: list = []
        per_step = []
        for _ in range(steps):
            _backward(model, optimizer, x, y)
            per_step.append(_sync_sites(lambda: results.append(guard.step(optimizer))))
        guard.close()
        recorded = gg.RunStore.open(Path(tmp) / "run").steps()["total_norm"].tolist()
    device_norms = [float(r.total_norm) for r in results]
    counts = [len(s) for s in per_step]
    detail = f"syncs per step {counts}"
    assert max(counts) <= 1, f"more than one sync in a step: {detail}"
    assert sum(counts) <= steps // log_every, f"syncs outside the flushes: {detail}"
    assert len(recorded) == steps, f"{len(recorded)} steps recorded of {steps}"
    for got, want in zip(recorded, device_norms):
        assert math.isclose(got, want, rel_tol=1e-6), f"recorded {got}, device {want}"
    flushes = sum(counts)
    return PASS, f"{flushes} syncs in {steps} steps (log_every={log_every}); values equal"


def _fused(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW (the usual case) or fused SGD with momentum, where a clip moves the
    update in proportion (Adam's normalisation hides much of a clip's effect)."""
    if kind == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)


def _tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.clone() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]


def fused_folding(device: str) -> tuple[str, str]:
    for kind in ("AdamW", "SGD"):
        base, (x, y) = _mlp(device), _data(device)
        twins = {name: copy.deepcopy(base) for name in ("folded", "unfolded", "torch")}
        optimizers = {name: _fused(kind, m) for name, m in twins.items()}
        max_norm = 0.05  # acts on every step
        guards = {
            name: gg.Guard(twins[name], gg.ClipNorm(max_norm), health=False, fold_fused=fold)
            for name, fold in (("folded", True), ("unfolded", False))
        }
        norms: dict[str, list[float]] = {name: [] for name in twins}
        for _ in range(5):
            for name, model in twins.items():
                _backward(model, optimizers[name], x, y)
                if name == "torch":
                    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                    optimizers[name].step()
                else:
                    total = guards[name].step(optimizers[name]).total_norm
                norms[name].append(float(total))
        for name in ("unfolded", "torch"):
            for a, b in zip(norms["folded"], norms[name]):
                assert math.isclose(a, b, rel_tol=1e-5), f"{kind} norms: folded {a}, {name} {b}"
            for p, q in zip(twins["folded"].parameters(), twins[name].parameters()):
                # last-bit differences only, far below one step's change
                message = f"{kind}: folded vs {name}"
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=message)
    return PASS, "5 clipped steps: folded == unfolded == clip_grad_norm_ + step (AdamW, SGD)"


def _gpt2_params(device: str) -> list[nn.Parameter]:
    """GPT-2 small's parameters on CUDA (a slice of a 1000-wide MLP's on the CPU), with
    gradients of global norm about 1."""
    from _shapes import gpt2_small_shapes, make_params, mlp_1000_shapes

    shapes = gpt2_small_shapes() if device == "cuda" else mlp_1000_shapes()[:100]
    params = []
    for _, host in make_params(shapes, torch.float32):
        param = nn.Parameter(host.detach().to(device))
        param.grad = host.grad.to(device)
        params.append(param)
    return params


def _step_costs(device: str, params, optimizer, guards: dict[str, gg.Guard]) -> dict[str, float]:
    """Milliseconds per step beyond ``optimizer.step()`` of ``clip_grad_norm_`` (key
    "torch") and of each guard's ``step`` (given the loss, as users are told to); medians
    of rounds of back-to-back steps, new gradient tensors each step."""

    def fresh() -> None:  # new gradient tensors stand in for a backward (the guard checks)
        for p in params:
            p.grad = p.grad.detach()

    loss = torch.tensor(1.0, device=device)
    candidates = {
        "step": lambda: (fresh(), optimizer.step()),
        "torch": lambda: (fresh(), torch.nn.utils.clip_grad_norm_(params, 1.0), optimizer.step()),
    }
    for name, guard in guards.items():
        candidates[name] = lambda guard=guard: (fresh(), guard.step(optimizer, loss=loss))
    reps, rounds = (20, 7) if device == "cuda" else (3, 3)
    ms = _median_ms(device, candidates, reps, rounds)
    return {name: t - ms["step"] for name, t in ms.items() if name != "step"}


def _median_ms(
    device: str, candidates: dict[str, Callable[[], Any]], reps: int, rounds: int
) -> dict[str, float]:
    """Median milliseconds per call of each candidate: ``rounds`` rounds (after one that
    warms up and compiles) of ``reps`` back-to-back calls, the device waited for."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(rounds + 1):
        for name, fn in candidates.items():
            _wait(device)
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            _wait(device)
            if round_:
                times[name].append((time.perf_counter() - start) / reps)
    return {name: 1e3 * sorted(v)[len(v) // 2] for name, v in times.items()}


def _ratios(costs: dict[str, float]) -> str:
    theirs = costs["torch"]
    return ", ".join(
        f"{name} {cost:.3f} ms ({cost / theirs if theirs > 0 else math.nan:.2f}x)"
        for name, cost in costs.items()
        if name != "torch"
    )


def fused_speed(device: str) -> tuple[str, str]:
    """``ClipNorm(1.0)`` folded into fused AdamW, against ``clip_grad_norm_`` + step."""
    params = _gpt2_params(device)
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    guards = {"guard.step (folded)": gg.Guard(params, gg.ClipNorm(1.0), health=False)}
    costs = _step_costs(device, params, optimizer, guards)
    return INFO, (
        f"{len(params)} tensors; clip cost: clip_grad_norm_ {costs['torch']:.3f} ms; "
        + _ratios(costs)
    )


def default_speed(device: str) -> tuple[str, str]:
    """The default policy's cost per step (its update compiled, as by default on CUDA, and
    op by op) and the old default's (ZClip), against ``clip_grad_norm_`` + step."""
    params = _gpt2_params(device)
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    old = gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_max_norm=10.0))
    guards = {
        "default": gg.Guard(params, health=False),
        "default op by op": gg.Guard(params, health=False, host_math=False, compile=False),
        "old default": gg.Guard(params, old, health=False, host_math=False),
    }
    costs = _step_costs(device, params, optimizer, guards)
    return INFO, (
        f"{len(params)} tensors, fused AdamW; clip_grad_norm_ {costs['torch']:.3f} ms; "
        + _ratios(costs)
    )


class _ByteLM(nn.Module):
    """A pre-LN transformer over bytes: GPT-2-like steps on CUDA, a toy on the CPU."""

    def __init__(self, width: int, layers: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        block = nn.TransformerEncoderLayer(
            width, max(1, width // 64), 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def training_step(device: str) -> tuple[str, str]:
    """A whole bf16-autocast training step of a byte-level transformer (forward, backward,
    fused AdamW): bare, with ``clip_grad_norm_``, and with the default guard recording to a
    store and given the loss, as users are told to. Then a NaN gradient: skipped, weights
    and optimizer state untouched, the skip in the store."""
    width, layers, context, batch, reps, rounds = (
        (768, 6, 256, 32, 20, 5) if device == "cuda" else (32, 1, 16, 4, 2, 2)
    )
    torch.manual_seed(0)
    base = _ByteLM(width, layers, context).to(device)
    tokens = torch.randint(0, 256, (batch, context + 1), device=device)
    twins = {name: copy.deepcopy(base) for name in ("bare", "torch", "policy", "guard")}
    optimizers = {name: _adamw(m, fused=True) for name, m in twins.items()}
    with tempfile.TemporaryDirectory() as tmp:
        guard = gg.Guard(twins["guard"], store=Path(tmp) / "run")
        guards = {"guard": guard, "policy": gg.Guard(twins["policy"], health=False)}

        def step(name: str, poison: bool = False):
            model, optimizer = twins[name], optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
            targets = tokens[:, 1:].flatten()
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets)
            loss.backward()
            if poison:
                model.head.weight.grad[0, 0] = math.nan
            if name == "torch":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if name in guards:
                return guards[name].step(optimizer, loss=loss)
            optimizer.step()
            return None

        candidates = {name: lambda name=name: step(name) for name in twins}
        ms = _median_ms(device, candidates, reps, rounds)
        model, optimizer = twins["guard"], optimizers["guard"]
        before = [p.detach().clone() for p in model.parameters()]
        moments = [t.clone() for s in optimizer.state.values() for t in s.values()]
        result = step("guard", poison=True)
        assert bool(result.skipped), "the NaN step was not skipped"
        assert "head.weight" in result.nonfinite_names(), result.nonfinite_names()
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b), "a parameter changed on the skipped step"
        after = [t for s in optimizer.state.values() for t in s.values()]
        for a, b in zip(after, moments):
            assert torch.equal(a, b), "optimizer state changed on the skipped step"
        guard.close()
        store = gg.RunStore.open(Path(tmp) / "run")
        recorded, skips = store.steps()["skipped"], store.events(kind="skip")
    last = (rounds + 1) * reps  # the NaN step
    assert len(recorded) == last + 1, f"{len(recorded)} steps recorded of {last + 1}"
    assert recorded.nonzero()[0].tolist() == [last], f"skipped: {recorded.nonzero()[0]}"
    assert [e.step for e in skips] == [last], f"skip events {skips}"
    n = sum(p.numel() for p in base.parameters())
    labels = {
        "torch": "clip_grad_norm_",
        "policy": "default guard, no store or health",
        "guard": "default guard recording",
    }
    costs = "; ".join(
        f"+{ms[k] - ms['bare']:.3f} ms {label} ({100 * (ms[k] - ms['bare']) / ms['bare']:.1f} %)"
        for k, label in labels.items()
    )
    return INFO, (
        f"{n / 1e6:.1f} M parameters, bf16 autocast: step {ms['bare']:.2f} ms bare; {costs}; "
        "a NaN step skipped, state untouched, recorded"
    )


def _host_copy(value: Any) -> Any:
    """A deep copy of nested dicts/lists of tensors, the tensors on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return copy.deepcopy(value)


def _rewind_once(device: str, storage: str) -> str:
    """One run of :func:`rewind_restore` with snapshots in ``storage``; its costs."""
    width, layers, context, batch = (512, 4, 128, 16) if device == "cuda" else (32, 1, 16, 4)
    every = 10
    torch.manual_seed(0)
    model = _ByteLM(width, layers, context).to(device)
    tokens = torch.randint(0, 256, (batch, context + 1), device=device)
    optimizer = _adamw(model, fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.9)
    guard = gg.Guard(model, health=False)
    rewind = gg.Rewind(
        model,
        optimizer,
        scheduler=scheduler,
        guard=guard,
        every=every,
        check_every=1,
        storage=storage,
    )

    def state() -> dict:
        return _host_copy(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            }  # the policy's state is restored too, then tightened: not compared
        )

    def train(poison: bool = False) -> tuple[Any, float, float]:
        optimizer.zero_grad(set_to_none=True)
        _wait(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        targets = tokens[:, 1:].flatten()
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets)
        if poison:
            loss = loss * math.nan
        loss.backward()
        guard.step(optimizer, loss=loss)
        scheduler.step()
        _wait(device)
        middle = time.perf_counter()
        event = rewind.step(loss)
        _wait(device)
        return event, middle - start, time.perf_counter() - middle

    steps, snaps, checks = [], [], []
    for i in range(5 * every):
        event, step_s, rewind_s = train()
        assert event is None, f"a rewind at step {i}: {event}"
        steps.append(step_s)
        (snaps if (i + 1) % every == 0 else checks).append(rewind_s)
    at_snapshot = state()
    for _ in range(3):
        assert train()[0] is None
    event = train(poison=True)[0]
    assert event is not None and event.data["reason"] == "nonfinite", event
    assert event.data["to_step"] == 5 * every, event.data
    assert_same(state(), at_snapshot)
    step_ms = 1e3 * sorted(steps)[len(steps) // 2]
    # the first `keep` (2) snapshots allocate their buffers; later ones reuse the oldest's
    snap_ms = 1e3 * sorted(snaps[2:])[len(snaps[2:]) // 2]
    check_ms = 1e3 * sorted(checks)[len(checks) // 2]
    share = 100 * snap_ms / 100 / step_ms
    return (
        f"{storage}: snapshot {snap_ms:.2f} ms ({rewind.snapshot_bytes / 2**20:.0f} MiB; "
        f"first {1e3 * snaps[0]:.0f} ms, allocating; every=100: {share:.2f} % of a "
        f"{step_ms:.1f} ms step), other steps {check_ms:.3f} ms"
    )


def rewind_restore(device: str) -> tuple[str, str]:
    """``Rewind`` on a bf16-autocast transformer with fused AdamW, a scheduler and the
    default guard, snapshots on the device and in pinned host memory: a NaN loss restores
    the parameters, optimizer and scheduler state bit for bit; what a snapshot
    costs against a training step."""
    details = [_rewind_once(device, storage) for storage in ("device", "host")]
    return PASS, "restored bit for bit from both; " + "; ".join(details)


def compiled_update(device: str) -> tuple[str, str]:
    """The default policy's update compiled (``Guard(compile=True)``, the default on CUDA
    with Triton) decides as op by op, and what it costs: the first step, then per step."""
    runs = {}
    for compiled in (False, True):
        model, (x, y) = _mlp(device), _data(device)
        optimizer = _adamw(model, fused=True)
        guard = gg.Guard(model, health=False, host_math=False, compile=compiled)
        decisions, times = [], []
        for step in range(60):
            loss = _backward(model, optimizer, x, y)
            if step == 30:  # a spike: the update clips it
                for p in model.parameters():
                    p.grad.mul_(50.0)
            _wait(device)
            start = time.perf_counter()
            result = guard.step(optimizer, loss=loss)
            _wait(device)
            times.append(time.perf_counter() - start)
            decisions.append(torch.stack([result.threshold.float(), result.clip_coef.float()]))
        runs[compiled] = (torch.stack(decisions).cpu(), times)
    (eager, eager_times), (fast, fast_times) = runs[False], runs[True]
    assert torch.equal(torch.isfinite(eager), torch.isfinite(fast)), "thresholds differ in kind"
    finite = torch.isfinite(eager)
    assert torch.allclose(fast[finite], eager[finite], rtol=1e-5), (
        f"decisions differ: {(fast - eager).abs()[finite].max():.3g}"
    )
    assert (eager[:, 1] < 1).any(), "the spike was not clipped"
    ms = {
        k: 1e3 * sorted(t[5:])[len(t[5:]) // 2]
        for k, t in (("eager", eager_times), ("fast", fast_times))
    }
    return PASS, (
        f"60 steps decided alike; first step {fast_times[0]:.1f} s (the compile); "
        f"guard.step {ms['fast']:.3f} ms compiled, {ms['eager']:.3f} ms op by op"
    )


def amp_fp16(device: str) -> tuple[str, str]:
    from gradguard.schema import SkipReason

    base, (x, y) = _mlp(device), _data(device)
    twins = {name: copy.deepcopy(base) for name in ("guard", "torch")}
    optimizers = {name: _fused("SGD", m) for name, m in twins.items()}
    scalers = {name: torch.amp.GradScaler(device, init_scale=2.0**10) for name in twins}
    max_norm, bad_step, worst = 0.05, 4, 0.0  # the clip acts on every step
    model, optimizer, scaler = twins["guard"], optimizers["guard"], scalers["guard"]
    guard = gg.Guard(model, gg.ClipNorm(max_norm), health=False)
    for step in range(8):
        for name, twin in twins.items():
            _backward(twin, optimizers[name], x, y, scalers[name])
            if step == bad_step:
                next(twin.parameters()).grad.view(-1)[0] = math.inf
        scale = scaler.get_scale()
        before = [p.detach().clone() for p in model.parameters()]
        state = _tensors(optimizer)
        reference = float(gg.measure(model).total_norm) / scale  # the unscaled norm
        result = guard.step(optimizer, scaler)
        scaler.update()
        # the same step by hand: unscale, clip, step
        scalers["torch"].unscale_(optimizers["torch"])
        torch.nn.utils.clip_grad_norm_(twins["torch"].parameters(), max_norm)
        scalers["torch"].step(optimizers["torch"])
        scalers["torch"].update()
        if step == bad_step:
            assert bool(result.skipped), "the overflow step was not skipped"
            assert int(result.reason) == SkipReason.AMP_OVERFLOW, f"reason {int(result.reason)}"
            for p, b in zip(model.parameters(), before):
                assert torch.equal(p, b), "a parameter changed on the skipped step"
            for s, b in zip(_tensors(optimizer), state):
                assert torch.equal(s, b), "optimizer state changed on the skip"
            assert scaler.get_scale() == scale / 2, "the scaler did not back off"
        elif not bool(result.skipped):
            error = abs(float(result.total_norm) - reference) / reference
            worst = max(worst, error)
            assert error < 1e-5, f"step {step}: norm {float(result.total_norm)} vs {reference}"
    # The folded clip and torch's multiply differ in the last bit, which the fp16
    # forward amplifies a little; a clip not applied would move every update 10x.
    for p, q in zip(model.parameters(), twins["torch"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg="guard vs unscale+clip+step")
    return PASS, (
        f"unscaled norms (worst rel. error {worst:.1e}); clipped like unscale_ + "
        "clip_grad_norm_ + scaler.step; overflow skipped with state intact"
    )


def low_precision(device: str) -> tuple[str, str]:
    model, (x, y) = _mlp(device, torch.bfloat16), _data(device, torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, None, health=False)
    _backward(model, optimizer, x, y)
    exact = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    got = float(guard.step(optimizer).total_norm)
    assert math.isclose(got, exact, rel_tol=1e-5), f"bf16: guard {got}, exact {exact}"
    # fp16 gradients whose norm (about 1.3e5) is beyond fp16's largest value (65504)
    big = nn.Parameter(torch.zeros(200_000, dtype=torch.float16, device=device))
    big.grad = torch.full_like(big, 300.0)
    exact16 = 300.0 * math.sqrt(big.numel())
    ours = float(gg.measure([big], dtype=torch.float32).total_norm)
    theirs = float(torch.nn.utils.get_total_norm([big.grad]))
    assert math.isclose(ours, exact16, rel_tol=1e-4), f"fp16: measure {ours}, exact {exact16}"
    bf16 = abs(got - exact) / exact
    return PASS, f"bf16 norm exact to {bf16:.1e}; fp16 norm {ours:.4g} (torch in fp16: {theirs})"


def nccl_fsdp2(device: str) -> tuple[str, str]:
    _require_cuda(device, gpus=2)
    import torch.multiprocessing as mp

    world = min(torch.cuda.device_count(), 8) if device == "cuda" else 2
    out = tempfile.mkdtemp(prefix="gg-fsdp2-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (world, port, out, device)
    mp.start_processes(_fsdp2_rank, args=args, nprocs=world, start_method="spawn")
    found = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
    n = found[0]["tensors"]
    for rank, f in enumerate(found):
        assert f["collectives"] == {"all_reduce": [8 * n]}, f"rank {rank}: {f['collectives']}"
        assert not f["syncs"], f"rank {rank}: syncs at {_sites(f['syncs'])}"
        assert f["total"] == found[0]["total"], f"rank {rank}: {f['total']} vs rank 0"
        assert math.isclose(f["total"], f["torch"], rel_tol=1e-5), f"{f['total']} vs {f['torch']}"
    return PASS, f"{world} ranks, {n} tensors: one all_reduce of {8 * n} B, same norm, no sync"


def _fsdp2_rank(rank: int, world: int, port: int, out: str, device: str) -> None:
    """One rank of :func:`nccl_fsdp2` (NCCL on CUDA; gloo when run on the CPU)."""
    import torch.distributed as dist
    from bench_distributed import count_collectives
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        model = _mlp(device)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        guard = gg.Guard(model, gg.ClipNorm(1.0), health=False)
        x, y = _data(device)
        x = x + rank  # a different batch per rank
        for _ in range(3):
            _backward(model, optimizer, x, y)
            guard.step(optimizer)
        _backward(model, optimizer, x, y)
        grads = [p.grad for p in model.parameters()]
        reference = torch.nn.utils.get_total_norm(grads)
        reference = reference.full_tensor() if hasattr(reference, "full_tensor") else reference
        _wait(device)
        found: list = []
        syncs: list[str] = []
        with count_collectives() as calls:
            if device == "cuda":
                syncs = _sync_sites(lambda: found.append(guard.step(optimizer)))
            else:  # CUDA's sync debug mode is not simulated in spawned CPU ranks
                found.append(guard.step(optimizer))
        result = {
            "tensors": len(grads),
            "collectives": calls,
            "syncs": syncs,
            "total": float(found[0].total_norm),
            "torch": float(reference),
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


#: name -> check, in the order they run
CHECKS: dict[str, Callable[[str], tuple[str, str]]] = {
    f.__name__: f
    for f in (
        sync_default_fused,
        sync_skip_fused,
        sync_skip_unfused,
        recording,
        fused_folding,
        fused_speed,
        default_speed,
        training_step,
        rewind_restore,
        compiled_update,
        amp_fp16,
        low_precision,
        nccl_fsdp2,
    )
}
