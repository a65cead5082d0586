"""GPU readiness: check gradguard's CUDA paths on this machine, print a table, exit 1 on
any failure.

    python benchmarks/gpu_check.py                 # every check, each in its own process
    python benchmarks/gpu_check.py --only sync_default_fused --in-process

Without CUDA it says so and exits 0 (``--device cpu`` runs the checks that do not need
CUDA, on the CPU: that is how the test suite exercises this script). Each check runs in
a fresh process with a time limit, so a crash, a hang or a poisoned CUDA context fails
that check alone. Checks:

* ``sync_*``: host syncs per steady-state ``guard.step``, counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` and confirmed with ``"error"`` where none
  is allowed: none for the default policy and for a skip policy with a fused optimizer
  (the skip is folded into ``found_inf``); at most one per step for a skip policy with a
  non-fused optimizer (reading the skip flag: the one sync gradguard allows), over what
  the bare ``optimizer.step()`` does by itself.
* ``recording``: the Recorder's CUDA path (pinned, non-blocking copy, once per
  ``log_every``): no sync on other steps, at most one per flush, and the store holds
  the values the device computed.
* ``fused_folding``: the clip folded into fused AdamW equals the unfolded clip and
  ``clip_grad_norm_`` + step; ``fused_speed``: its cost against ``clip_grad_norm_``
  (GPT-2 small shapes on CUDA; reported, not judged); ``default_speed``: the default
  policy's cost, its update compiled and op by op, and the old default's (ZClip), each
  against ``clip_grad_norm_`` (same shapes; reported).
* ``training_step``: a bf16-autocast byte-level transformer's whole step, bare, with
  ``clip_grad_norm_``, with the default guard alone and recording to a store (costs
  reported); then a NaN gradient skipped with weights and optimizer state untouched
  and the skip in the store.
* ``rewind_restore``: ``Rewind`` with snapshots on the device and in pinned host
  memory restores parameters, optimizer and scheduler state bit for bit after a NaN
  loss; a snapshot's cost against the step.
* ``amp_fp16``: autocast fp16 + GradScaler: norms of the unscaled gradients, an
  overflow skipped with parameters untouched. ``low_precision``: bf16 norms, fp16
  gradients whose norm exceeds fp16's range.
* ``nccl_fsdp2`` (2+ GPUs): FSDP2 over NCCL, one all-reduce of 8 bytes per tensor, the
  same norm on every rank and equal to torch's, no sync in ``guard.step``.

Only gradguard's public API is used (``Guard``, ``guard.step``, ``measure``,
``clip_grad_norm_``, ``Recorder``, ``RunStore``, the policies).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import _gpu_checks as checks

PASS, FAIL, SKIP, INFO = "pass", "FAIL", "skip", "info"
CHECK_TIMEOUT_S = 600


@dataclass
class Result:
    """One row of the table."""

    name: str
    status: str  # PASS, FAIL, SKIP or INFO
    detail: str


def run_check(name: str, device: str) -> Result:
    """Run one check in this process; any exception is that check's failure."""
    fn = checks.CHECKS[name]
    try:
        status, detail = fn(device)
    except checks.Skip as why:
        return Result(name, SKIP, str(why))
    except Exception as error:  # a check must not hide the others
        return Result(name, FAIL, f"{type(error).__name__}: {error}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
    return Result(name, status, detail)


def run_isolated(name: str, command: Sequence[str], timeout_s: float) -> Result:
    """Run ``command`` (a child writing one Result as JSON to the file named by its last
    argument); a crash, a hang or no result is that check's failure. On a hang the
    child's whole process group goes (ranks it spawned included)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        child = subprocess.Popen(
            [*command, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            log, _ = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return Result(name, FAIL, f"no result within {timeout_s:.0f} s")
        if out.exists():
            return Result(**json.loads(out.read_text()))
        tail = " | ".join(log.strip().splitlines()[-3:])
        return Result(name, FAIL, f"process exited with {child.returncode}: {tail}")


def format_table(results: Sequence[Result]) -> str:
    """The results as a plain-text table with a summary line."""
    width = max([len("check")] + [len(r.name) for r in results])
    lines = [f"{'check':{width}s}  status  detail", f"{'-' * width}  ------  ------"]
    for r in results:
        detail = r.detail.replace("\n", " ")
        lines.append(f"{r.name:{width}s}  {r.status:6s}  {detail}")
    failed = sum(r.status == FAIL for r in results)
    lines.append(
        f"{len(results)} checks: {failed} failed, {sum(r.status == SKIP for r in results)} skipped"
    )
    return "\n".join(lines)


def exit_code(results: Sequence[Result]) -> int:
    """1 if any check failed, else 0 (skipped and informational rows do not fail)."""
    return 1 if any(r.status == FAIL for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(checks.CHECKS), help="checks to run")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--in-process", action="store_true", help="no child processes")
    parser.add_argument("--timeout", type=float, default=CHECK_TIMEOUT_S, help="per check, s")
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: needs CUDA (torch.cuda.is_available() is False); nothing checked.")
        return 0
    names = args.only or list(checks.CHECKS)
    if args.result is not None:  # a child: one check, its result to the file
        result = run_check(names[0], args.device)
        args.result.write_text(json.dumps(asdict(result)))
        return 0
    print(_environment(args.device), flush=True)
    results = []
    for name in names:
        if args.in_process:
            result = run_check(name, args.device)
        else:
            command = [sys.executable, __file__, "--only", name, "--device", args.device]
            result = run_isolated(name, [*command, "--result"], args.timeout)
        results.append(result)
        print(f"  {name}: {result.status}", flush=True)
    print(format_table(results))
    return exit_code(results)


def _environment(device: str) -> str:
    text = f"torch {torch.__version__}"
    if device == "cuda":
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        text += f", CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {', '.join(names)}"
    return text + f", device {device}"


if __name__ == "__main__":
    sys.exit(main())
