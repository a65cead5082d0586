"""Score the findings recorded in each run's store against the run's labels.

A finding is a *claim* unless it is information about the clip threshold
(``clip_inactive``, ``clip_hovering``, or ``clip_saturated`` at info severity): advice
about a setting, not a statement that something is wrong. A claim is true when a label
of its run lists its kind (as a detection or as a consequence) and its step range meets
the labelled episode widened by one log interval. A label is detected when a claim of
one of its detection kinds meets it. Range accuracy: the detections of a label span its
episode to within one log interval at both ends. Origin accuracy: every detection that
states an origin states the labelled one (``forward`` for the data, the loss or the
forward pass; a layer otherwise, and a NaN born in backward is never blamed on the data).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gradguard.health import Finding, Severity
from gradguard.health.findings import BACKWARD, FORWARD
from gradguard.layers import module_of
from gradguard.record.store import RunStore, StoreError

from .faults import Label
from .runner import RunSpec

NAN_FAULTS = ("nonfinite_data", "backward_nan", "log_of_zero")


class ScoreError(ValueError):
    """A store or a result file the scorer cannot read."""


def read_findings(run_dir: Path) -> list[Finding]:
    """The findings recorded in a run store: the latest state of each episode, by step."""
    try:
        with RunStore.open(run_dir) as store:
            events = store.events()
    except StoreError as e:
        raise ScoreError(f"cannot score {str(run_dir)!r}: {e}") from e
    latest: dict[str, Finding] = {}
    for event in events:
        if not event.kind.startswith("health."):
            continue
        try:
            finding = Finding.from_event(event)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ScoreError(f"{str(run_dir)!r} holds a malformed finding: {e}") from e
        # a store without episode upserts keeps every update: the last one wins
        latest[finding.key or f"{finding.kind.value}@{finding.steps[0]}"] = finding
    return sorted(latest.values(), key=lambda f: (f.steps[0], f.kind.value))


def replay_findings(run_dir: Path) -> list[Finding]:
    """The findings today's rules make on a recorded run, replayed offline from its store
    (for working on the rules; without the live backward order, a layer that never got a
    gradient is invisible)."""
    from gradguard.health import HealthConfig, diagnose

    try:
        with RunStore.open(run_dir) as store:
            meta = store.meta()
            steps = store.steps()
            tensor_steps, names, norms = store.tensor_norms()
            skips = store.events(kind="skip")
    except StoreError as e:
        raise ScoreError(f"cannot replay {str(run_dir)!r}: {e}") from e
    family = (meta.get("config") or {}).get("family", "default")
    columns = {k: v for k, v in steps.items() if k != "step"}
    return diagnose(
        columns,
        steps["step"],
        names,
        tensor_steps,
        norms,
        HealthConfig(family),
        events=skips,
        chunk=int((meta.get("config") or {}).get("log_every", 50)),
    )


def is_claim(finding: Finding) -> bool:
    """Whether a finding says something is wrong (not advice on the clip threshold)."""
    advice = finding.kind.value in ("clip_inactive", "clip_hovering", "clip_saturated")
    return not (advice and finding.severity is Severity.INFO)


def _meets(finding: Finding, label: Label, slack: int) -> bool:
    first, last = finding.steps
    return first <= label.end + slack and last >= label.start - slack


def _origin_ok(finding: Finding, label: Label) -> bool | None:
    """Whether the finding's stated origin matches the label's (None: it states none)."""
    stated = [finding.origin] if finding.origin else []
    if finding.kind.value == "dead_layer":
        stated = list(finding.params)
    if not stated:
        return None
    if label.origin == FORWARD:
        return all(o == FORWARD for o in stated)
    if finding.kind.value == "nonfinite":
        origin = stated[0]
        return origin != FORWARD and (origin == BACKWARD or _same_layer(origin, label.origin))
    return any(_same_layer(o, label.origin) for o in stated)


def _same_layer(name: str, layer: str) -> bool:
    return name == layer or module_of(name) == layer or name.startswith(layer + ".")


@dataclass
class LabelScore:
    fault: str
    start: int
    end: int
    detected: bool
    range_ok: bool
    origin: str | None
    origin_ok: bool | None  # None: no origin labelled
    layer_named: bool | None  # NaN born in backward: the layer itself was named
    found: tuple[int, int] | None


@dataclass
class RunScore:
    name: str
    split: str
    fault_class: str
    steps: int
    log_every: int
    seconds: float
    findings: list[dict] = field(default_factory=list)
    labels: list[LabelScore] = field(default_factory=list)
    true_claims: int = 0
    detection_claims: int = 0  # true claims of a detection kind (consequences not counted)
    false_claims: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.labels


def score_run(
    spec: RunSpec,
    split: str,
    findings: list[Finding],
    seconds: float = 0.0,
    warnings: list[str] | None = None,
) -> RunScore:
    """Match one run's findings with its labels."""
    slack = spec.log_every
    labels = spec.labels()
    score = RunScore(spec.name, split, spec.fault_class, spec.steps, slack, seconds)
    score.warnings = list(warnings or [])
    score.findings = [
        {
            "kind": f.kind.value,
            "severity": f.severity.value,
            "steps": list(f.steps),
            "open": f.open,
            "origin": f.origin,
            "message": f.message,
        }
        for f in findings
    ]
    claims = [f for f in findings if is_claim(f)]
    for f in claims:
        if any(f.kind.value in (*lab.kinds, *lab.also) and _meets(f, lab, slack) for lab in labels):
            score.true_claims += 1
            score.detection_claims += any(
                f.kind.value in lab.kinds and _meets(f, lab, slack) for lab in labels
            )
        else:
            score.false_claims.append(f"{f.severity.value} {f.kind.value} {f.steps}: {f.message}")
    for label in labels:
        hits = [f for f in claims if f.kind.value in label.kinds and _meets(f, label, slack)]
        span = (min(f.steps[0] for f in hits), max(f.steps[1] for f in hits)) if hits else None
        range_ok = bool(
            span and abs(span[0] - label.start) <= slack and abs(span[1] - label.end) <= slack
        )
        origin_ok = layer_named = None
        if label.origin is not None:
            verdicts = [_origin_ok(f, label) for f in hits]
            stated = [v for v in verdicts if v is not None]
            origin_ok = bool(stated) and all(stated)
            if label.fault == "backward_nan":
                layer_named = any(
                    f.origin not in (None, FORWARD, BACKWARD)
                    and _same_layer(f.origin, label.origin)
                    for f in hits
                )
        score.labels.append(
            LabelScore(
                label.fault,
                label.start,
                label.end,
                bool(hits),
                range_ok,
                label.origin,
                origin_ok,
                layer_named,
                span,
            )
        )
    return score


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f} ({a}/{b})" if b else "—"


def summary(scores: list[RunScore], title: str) -> str:
    """Markdown tables: overall, per finding kind and per fault class."""
    claims_true = sum(s.true_claims for s in scores)
    claims_detecting = sum(s.detection_claims for s in scores)
    claims_false = sum(len(s.false_claims) for s in scores)
    labels = [lab for s in scores for lab in s.labels]
    detected = [lab for lab in labels if lab.detected]
    origin = [lab for lab in detected if lab.fault in NAN_FAULTS and lab.origin_ok is not None]
    named = [lab for lab in detected if lab.layer_named is not None]
    healthy = [s for s in scores if s.healthy]
    healthy_steps = sum(s.steps for s in healthy)
    loud = sum(1 for s in healthy for f in s.findings if f["severity"] in ("warning", "critical"))
    python_warnings = sum(len(s.warnings) for s in healthy)
    seconds = sum(s.seconds for s in scores)
    ranges = sum(lab.range_ok for lab in detected)
    origins = sum(bool(lab.origin_ok) for lab in origin)
    layers = sum(bool(lab.layer_named) for lab in named)
    per_1000 = 1000 * loud / max(healthy_steps, 1)
    lines = [
        f"### {title}: {len(scores)} runs ({len(healthy)} healthy), {seconds:.0f} s of training",
        "",
        "| measure | value |",
        "|---|---|",
        f"| precision (true claims / claims) | {_ratio(claims_true, claims_true + claims_false)} |",
        f"| claims that detect a labelled fault (the rest: its labelled consequences) | "
        f"{_ratio(claims_detecting, claims_true + claims_false)} |",
        f"| recall (labelled faults detected) | {_ratio(len(detected), len(labels))} |",
        f"| range accuracy (detected faults) | {_ratio(ranges, len(detected))} |",
        f"| origin accuracy, NaN faults (data/loss vs layer) | {_ratio(origins, len(origin))} |",
        f"| layer named, NaN born in backward | {_ratio(layers, len(named))} |",
        f"| warnings + criticals per 1000 healthy steps | {per_1000:.2f} ({loud} in "
        f"{healthy_steps} steps) |",
        f"| gradguard warnings raised in healthy runs | {python_warnings} |",
        "",
        "| finding kind | claims | true | false | precision |",
        "|---|---|---|---|---|",
    ]
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s in scores:
        for f in s.findings:
            kind = f["kind"]
            if kind in ("clip_inactive", "clip_hovering") or (
                kind == "clip_saturated" and f["severity"] == "info"
            ):
                continue
            per_kind[kind][0] += 1
        for text in s.false_claims:
            per_kind[text.split()[1]][1] += 1
    for kind, (n, false) in sorted(per_kind.items()):
        lines.append(f"| {kind} | {n} | {n - false} | {false} | {_ratio(n - false, n)} |")
    lines += [
        "",
        "| fault | labelled | detected (recall) | range ok | origin ok |",
        "|---|---|---|---|---|",
    ]
    per_fault: dict[str, list[LabelScore]] = defaultdict(list)
    for lab in labels:
        per_fault[lab.fault].append(lab)
    for fault, group in sorted(per_fault.items()):
        found = [lab for lab in group if lab.detected]
        with_origin = [lab for lab in found if lab.origin_ok is not None]
        ranged = _ratio(sum(lab.range_ok for lab in found), len(found))
        origins = _ratio(sum(bool(lab.origin_ok) for lab in with_origin), len(with_origin))
        lines.append(
            f"| {fault} | {len(group)} | {_ratio(len(found), len(group))} | {ranged} | "
            f"{origins if with_origin else '—'} |"
        )
    return "\n".join(lines)


def details(scores: list[RunScore]) -> str:
    """One block per run with its misses, false claims and range errors."""
    out = []
    for s in scores:
        problems = [f"  false: {t}" for t in s.false_claims]
        for lab in s.labels:
            if not lab.detected:
                problems.append(f"  missed: {lab.fault} {lab.start}–{lab.end}")
            elif not lab.range_ok:
                problems.append(
                    f"  range: {lab.fault} labelled {lab.start}–{lab.end}, found {lab.found}"
                )
            if lab.origin_ok is False:
                problems.append(f"  origin: {lab.fault} labelled {lab.origin}")
        if problems:
            out.append(f"{s.name} ({s.split}, {s.seconds:.1f} s)")
            out += problems
    return "\n".join(out) if out else "no misses, no false claims"


def dump(scores: list[RunScore], path: Path) -> None:
    path.write_text(json.dumps([asdict(s) for s in scores], indent=1, default=str))
