"""Logger sinks write what was recorded, read back through each backend's own reader."""

from __future__ import annotations

import io
import math
import sys
import time

import pytest
import torch

from gradguard.record import Event, Recorder
from gradguard.record.sinks import _naming

NAMES = ("encoder.layers.0.weight", "head:bias")  # ':' is illegal in TB/MLflow names
LOG_EVERY = 3


def _record(sink, steps: int = 6) -> dict[int, float]:
    rec = Recorder(False, sinks=[sink], log_every=LOG_EVERY, tensor_every=3)
    rec.start(NAMES, [(4,), (2,)], config={"model": "tiny"})
    totals = {}
    for s in range(steps):
        total = 0.5 + s
        stats = None
        if rec.wants_tensor_norms(s):
            stats = _Stats(torch.tensor([0.25 * (s + 1), 2.0 * (s + 1)]))
        rec.record(
            s,
            total_norm=torch.tensor(total),
            clipped_norm=torch.tensor(min(total, 1.0)),
            clip_coef=torch.tensor(min(1.0, 1.0 / total)),
            threshold=1.0,
            skipped=torch.tensor(False),
            reason=0,
            loss=torch.tensor(3.0 - s),
            stats=stats,
        )
        totals[s] = total
    rec.event(Event(4, "finding", "norm above threshold"))
    rec.close()
    return totals


class _Stats:
    def __init__(self, norms):
        self.norms, self.names, self.shapes = norms, NAMES, (torch.Size([4]), torch.Size([2]))

    def labels(self):
        return NAMES


def test_naming_and_sanitising():
    assert _naming.tensor_key("head:bias", _naming.sanitize_mlflow) == "grad/norm/head_bias"
    assert _naming.sanitize_mlflow("a.b c/d-e_f") == "a.b c/d-e_f"
    assert _naming.sanitize_tensorboard("layer.0 w") == "layer.0_w"


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'gradguard[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradguard.record.sinks import TensorBoardSink

    totals = _record(TensorBoardSink(tmp_path, histograms_every=3))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "grad/total_norm",
        "grad/clipped_norm",
        "grad/clip_coef",
        "grad/threshold",
        "grad/skipped",
        "train/loss",
    } <= tags
    assert "train/lr" not in tags  # never given
    assert {"grad/norm/encoder.layers.0.weight", "grad/norm/head_bias"} <= tags
    got = {e.step: e.value for e in acc.Scalars("grad/total_norm")}
    assert got == pytest.approx(totals)
    bias = {e.step: e.value for e in acc.Scalars("grad/norm/head_bias")}
    assert bias == pytest.approx({0: 2.0, 3: 8.0})
    assert acc.Tags()["histograms"] == ["grad/norm_histogram"]


def _wandb_history(path) -> dict[int, dict[str, float]]:
    """Read the history rows of an offline ``.wandb`` file (leveldb-log framed protobufs)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, rows = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                row = {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in record.history.item
                }
                rows[int(row["_step"])] = row
    return rows


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'gradguard[wandb]'")
    from gradguard.record.sinks import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink(project="gradguard-test", mode="offline", dir=str(tmp_path))
    totals = _record(sink)
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "no offline run data written"
    deadline = time.monotonic() + 20  # wandb's service process may still be writing the file
    while len(rows := _wandb_history(files[0])) < len(totals) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {s: r["grad/total_norm"] for s, r in rows.items()} == pytest.approx(totals)
    assert rows[3]["grad/norm/head_bias"] == pytest.approx(8.0)
    assert rows[3]["grad/norm/encoder.layers.0.weight"] == pytest.approx(1.0)
    assert "grad/norm/head_bias" not in rows[1]


def test_mlflow_metrics_read_back(tmp_path):
    pytest.importorskip("mlflow", reason="pip install 'gradguard[mlflow]'")
    from mlflow.tracking import MlflowClient

    from gradguard.record.sinks import MLflowSink

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = MLflowSink(tracking_uri=uri, experiment_name="gg-test")
    totals = _record(sink)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(sink.run_id, "grad/total_norm")
    assert {m.step: m.value for m in history} == pytest.approx(totals)
    bias = client.get_metric_history(sink.run_id, "grad/norm/head_bias")
    assert {m.step: m.value for m in bias} == pytest.approx({0: 2.0, 3: 8.0})
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["gradguard.model"] == "tiny"
    assert "norm above threshold" in run.data.tags["gradguard.event.finding"]


def test_console_prints_one_line_per_flush():
    from gradguard.record.sinks import ConsoleSink

    out = io.StringIO()
    _record(ConsoleSink(file=out, use_rich=False))
    lines = out.getvalue().splitlines()
    flushes = [line for line in lines if "steps" in line]
    assert len(flushes) == 2
    assert flushes[0].startswith("gradguard | steps 0-2 | norm 1.5 (0.5..2.5)")
    assert "clipped 2/3" in flushes[0] and "loss 1" in flushes[0]
    assert any("finding: norm above threshold" in line for line in lines)


def test_console_with_rich():
    pytest.importorskip("rich", reason="pip install 'gradguard[console]'")
    from gradguard.record.sinks import ConsoleSink

    out = io.StringIO()
    _record(ConsoleSink(file=out))
    assert sum("steps" in line for line in out.getvalue().splitlines()) == 2


def test_missing_backend_names_the_extra(monkeypatch):
    from gradguard.record.sinks import MLflowSink, TensorBoardSink, WandbSink

    for module, sink, extra in (
        ("tensorboard", TensorBoardSink, "tensorboard"),
        ("wandb", WandbSink, "wandb"),
        ("mlflow", MLflowSink, "mlflow"),
    ):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
        with pytest.raises(ImportError, match=rf"pip install 'gradguard\[{extra}\]'"):
            sink()


def test_nan_values_reach_the_metrics():
    rec = Recorder(False, log_every=2)
    rec.start(NAMES)
    rec.record(
        0,
        total_norm=torch.tensor(float("nan")),
        clipped_norm=0.0,
        clip_coef=0.0,
        threshold=1.0,
        skipped=True,
        reason=1,
    )
    batch = rec.record(
        1,
        total_norm=torch.tensor(float("inf")),
        clipped_norm=0.0,
        clip_coef=0.0,
        threshold=1.0,
        skipped=True,
        reason=1,
    )
    rows = dict(_naming.step_metrics(batch))
    assert math.isnan(rows[0]["grad/total_norm"]) and math.isinf(rows[1]["grad/total_norm"])
    assert "train/loss" not in rows[0]
    rec.close()


def _episode_events() -> list[list[Event]]:
    """An episode opened, extended twice and closed over four flushes, beside point events."""
    key, kind = "health.spike@10", "health.spike"
    return [
        [Event(10, kind, "spike", {}, 10, key, True), Event(10, "skip", "skipped 10")],
        [Event(10, kind, "spike", {}, 12, key, True)],
        [Event(10, kind, "spike", {}, 15, key, True)],
        [Event(10, kind, "spike", {}, 18, key, False), Event(18, "skip", "skipped 18")],
    ]


def test_episodes_log_once_opened_and_once_closed():
    from gradguard.record.sinks import ConsoleSink

    out = io.StringIO()
    sink = ConsoleSink(file=out, use_rich=False)
    for events in _episode_events():
        sink.write_events(events)
    assert out.getvalue().splitlines() == [
        "gradguard | step 10 | health.spike: opened at step 10: spike",
        "gradguard | step 10 | skip: skipped 10",
        "gradguard | step 18 | health.spike: closed (steps 10-18): spike",
        "gradguard | step 18 | skip: skipped 18",
    ]


def test_tensorboard_text_holds_an_episode_twice(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'gradguard[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradguard.record.sinks import TensorBoardSink

    sink = TensorBoardSink(tmp_path)
    for events in _episode_events():
        sink.write_events(events)
    sink.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    texts = [
        (e.step, e.tensor_proto.string_val[0].decode())
        for e in acc.Tensors("events/health.spike/text_summary")
    ]
    assert texts == [(10, "opened at step 10: spike"), (18, "closed (steps 10-18): spike")]
