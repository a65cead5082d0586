"""The labelled corpus: healthy runs and faulty runs over five model families.

Families: MLP (scikit-learn tables), CNN (digit images), RNN (row LSTM on digits, a GRU
byte LM, a tanh RNN on the addition problem), transformer (a byte-level GPT on the
standard library's source) and embedding-heavy (hashed bigram tables). Each fault class
has three variants that differ in model, optimizer, policy, precision or step; one of
each class (and a third of the healthy runs) is held out, chosen by :data:`SPLIT_SEED`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

from .faults import (
    BackwardNaN,
    CorruptBatch,
    DeadReLU,
    ExplodingRNN,
    FrozenByMistake,
    LabelNoise,
    LogOfZero,
    LRJump,
    LRTooHigh,
    NonFiniteData,
    OverflowingBatches,
    ScaleCollapse,
    ShortGrowthInterval,
    Vanishing,
)
from .runner import RunSpec

SPLIT_SEED = 14
NAN, INF = math.nan, math.inf

R = RunSpec
DIGITS = {"table": "digits"}
WINE = {"table": "wine"}
CANCER = {"table": "breast_cancer"}
DIABETES = {"table": "diabetes"}
SMALL_LM = {"length": 24}
SMALL_GPT = {"length": 16, "width": 24}

# fmt: off
HEALTHY: list[RunSpec] = [
    R("healthy_mlp_adamw", "mlp", DIGITS),
    R("healthy_mlp_sgd_cosine", "mlp", DIGITS, optimizer="sgd", lr=0.05, schedule="cosine",
      policy="monitor", batch=64, seed=1),
    R("healthy_mlp_wine_accum", "mlp", {**WINE, "width": 32}, optimizer="adam", lr=3e-3,
      schedule="warmup", batch=16, accumulate=2, seed=2),
    R("healthy_mlp_cancer_clip", "mlp", CANCER, optimizer="rmsprop", lr=1e-3,
      policy="clip:1.0", log_every=10, seed=3),
    R("healthy_mlp_diabetes_bf16", "mlp", DIABETES, amp="bf16", lr=3e-3, seed=4),
    R("healthy_quickstart_like", "mlp", {**DIABETES, "target_scale": 4.0, "activation": "gelu"},
      optimizer="adamw_fused", lr=3e-3, amp="bf16", accumulate=4, log_every=10, steps=200,
      seed=5),
    R("healthy_cnn_sgd_warmup_cosine", "cnn", {}, optimizer="sgd", lr=0.05,
      schedule="warmup_cosine", seed=6),
    R("healthy_cnn_bf16_accum", "cnn", {}, amp="bf16", accumulate=2, batch=16, log_every=25,
      seed=7),
    R("healthy_lstm_clip", "lstm", {}, optimizer="adam", lr=3e-3, policy="clip:5.0", seed=8),
    R("healthy_gru_lm", "gru_lm", {"hidden": 48, **SMALL_LM}, lr=3e-3,
      schedule="warmup_cosine", batch=16, log_every=25, steps=250, seed=9),
    R("healthy_gpt_warmup_cosine", "transformer_lm", SMALL_GPT, lr=1e-3,
      schedule="warmup_cosine", batch=16, steps=250, seed=10),
    R("healthy_gpt_bf16_clip", "transformer_lm", SMALL_GPT, lr=3e-4, amp="bf16",
      accumulate=2, batch=8, policy="clip:1.0", log_every=10, steps=250, seed=11),
    R("healthy_embedding_adam", "embedding_lm", SMALL_LM, optimizer="adam", lr=1e-2,
      batch=16, seed=12),
    R("healthy_rnn_addition_clip", "addition_rnn", {"length": 30}, optimizer="sgd", lr=0.01,
      policy="clip:1.0", seed=13),
    R("healthy_norm_mlp_sgd", "norm_mlp", DIGITS, optimizer="sgd", lr=0.02, seed=14),
    R("healthy_ln_mlp_fp16", "ln_mlp", DIGITS, amp="fp16", lr=2e-3, seed=15),
]

FAULTY: list[RunSpec] = [
    # the learning rate is too high from the first step
    R("lr_high_mlp_sgd", "mlp", DIGITS, optimizer="sgd", lr=0.05, policy="monitor",
      faults=(LRTooHigh(40.0),), seed=20),
    R("lr_high_gpt", "transformer_lm", SMALL_GPT, lr=1e-3, batch=16, steps=250,
      faults=(LRTooHigh(1000.0),), seed=21),
    R("lr_high_cnn_adam", "cnn", {}, optimizer="adam", lr=1e-3, policy="monitor",
      log_every=25, faults=(LRTooHigh(300.0),), seed=22),
    # the learning rate jumps mid-run
    R("lr_jump_mlp", "mlp", DIGITS, faults=(LRJump(150, 5000.0),), seed=23),
    R("lr_jump_lstm", "lstm", {}, optimizer="adam", lr=3e-3, policy="monitor", log_every=10,
      faults=(LRJump(120, 300.0),), seed=24),
    R("lr_jump_gru", "gru_lm", {"hidden": 48, **SMALL_LM}, lr=2e-3, schedule="warmup_cosine",
      batch=16, log_every=25, steps=250, faults=(LRJump(170, 1000.0),), seed=25),
    # one corrupted batch (inputs ×1000)
    R("corrupt_mlp_cancer", "mlp", CANCER, log_every=10, faults=(CorruptBatch(150),), seed=26),
    R("corrupt_cnn_sgd_wrecks", "cnn", {}, optimizer="sgd", lr=0.05, policy="monitor",
      faults=(CorruptBatch(180, wrecks=True),), seed=27),
    R("corrupt_mlp_diabetes", "mlp", DIABETES, optimizer="adam", log_every=25,
      faults=(CorruptBatch(120),), seed=28),
    # NaN or inf in the input or the labels
    R("nan_input_mlp", "mlp", DIGITS, faults=(NonFiniteData(140),), seed=29),
    R("inf_label_diabetes_accum", "mlp", DIABETES, accumulate=2,
      faults=(NonFiniteData(100, INF, "y"),), seed=30),
    R("nan_input_cnn_monitor", "cnn", {}, policy="monitor",
      faults=(NonFiniteData(90, NAN, "x", wrecks=True),), seed=31),
    # a NaN born in one layer's backward (sqrt at 0)
    R("backward_nan_digits", "norm_mlp", DIGITS, faults=(BackwardNaN(130),), seed=32),
    R("backward_nan_wine_long", "norm_mlp", WINE, optimizer="adam", log_every=10, batch=16,
      faults=(BackwardNaN(100, 20),), seed=33),
    R("backward_nan_cancer_sgd", "norm_mlp", CANCER, optimizer="sgd", lr=0.02, amp="bf16",
      faults=(BackwardNaN(200, 3),), seed=34),
    # log of 0 in a hand-written loss
    R("log0_digits", "mlp", {**DIGITS, "naive_loss": True}, faults=(LogOfZero(160),), seed=35),
    R("log0_wine_accum", "mlp", {**WINE, "naive_loss": True}, accumulate=2, batch=16,
      faults=(LogOfZero(90),), seed=36),
    R("log0_cancer_bf16", "mlp", {**CANCER, "naive_loss": True}, amp="bf16", log_every=25,
      faults=(LogOfZero(200),), seed=37),
    # a dead ReLU layer
    R("dead_relu_mlp", "mlp", {**DIGITS, "depth": 3}, faults=(DeadReLU(100, "2"),), seed=38),
    R("dead_relu_cancer_monitor", "mlp", {**CANCER, "width": 32}, policy="monitor",
      faults=(DeadReLU(150, "0"),), seed=39),
    R("dead_relu_cnn", "cnn", {}, log_every=25, faults=(DeadReLU(120, "conv2"),), seed=40),
    # vanishing gradients in a deep sigmoid stack
    R("vanishing_digits", "mlp", {**DIGITS, "width": 32, "depth": 10, "activation": "sigmoid"},
      faults=(Vanishing(),), seed=41),
    R("vanishing_cancer_sgd", "mlp",
      {**CANCER, "width": 32, "depth": 12, "activation": "sigmoid"}, optimizer="sgd", lr=0.05,
      policy="monitor", faults=(Vanishing(),), seed=42),
    R("vanishing_wine", "mlp", {**WINE, "width": 32, "depth": 10, "activation": "sigmoid"},
      optimizer="adam", log_every=10, batch=16, faults=(Vanishing(),), seed=43),
    # an exploding RNN
    R("exploding_rnn_monitor", "addition_rnn", {"length": 40, "gain": 1.1}, optimizer="sgd",
      lr=0.2, policy="monitor", faults=(ExplodingRNN(),), seed=44),
    R("exploding_rnn_default", "addition_rnn", {"length": 30, "gain": 1.5}, optimizer="sgd",
      lr=0.1, faults=(ExplodingRNN(),), seed=45),
    R("exploding_rnn_log10", "addition_rnn", {"length": 40, "gain": 1.2}, optimizer="sgd",
      lr=0.15, policy="monitor", log_every=10, faults=(ExplodingRNN(),), seed=46),
    # fp16 overflow (CPU autocast to float16 with a real GradScaler)
    R("fp16_overflow_bursts", "ln_mlp", DIGITS, amp="fp16",
      faults=(OverflowingBatches(150, 12, 3),), seed=47),
    R("fp16_overflow_growth", "ln_mlp", DIGITS, amp="fp16", growth_interval=5,
      faults=(ShortGrowthInterval(5),), seed=48),
    R("fp16_overflow_wine", "ln_mlp", {**WINE, "width": 32}, amp="fp16", batch=16,
      log_every=25, faults=(OverflowingBatches(100, 14, 4),), seed=49),
    # the loss scale collapses
    R("scale_collapse_digits", "ln_mlp", DIGITS, amp="fp16",
      faults=(ScaleCollapse(150),), seed=50),
    R("scale_collapse_wine_monitor", "ln_mlp", WINE, amp="fp16", policy="monitor", batch=16,
      faults=(ScaleCollapse(100),), seed=51),
    R("scale_collapse_cancer", "ln_mlp", CANCER, amp="fp16", log_every=25,
      faults=(ScaleCollapse(200),), seed=52),
    # label noise: every label random
    R("label_noise_mlp", "mlp", DIGITS, faults=(LabelNoise(10, 1),), seed=53),
    R("label_noise_cnn_sgd", "cnn", {}, optimizer="sgd", lr=0.05,
      faults=(LabelNoise(10, 2),), seed=54),
    R("label_noise_gpt", "transformer_lm", SMALL_GPT, batch=16, log_every=10, steps=250,
      faults=(LabelNoise(256, 3),), seed=55),
    # a layer frozen by mistake
    R("frozen_table_embedding", "embedding_lm", SMALL_LM, optimizer="adam", lr=1e-2,
      batch=16, faults=(FrozenByMistake("table"),), seed=56),
    R("frozen_embedding_gpt", "transformer_lm", SMALL_GPT, batch=16, steps=250,
      faults=(FrozenByMistake("embed"),), seed=57),
    R("frozen_conv1_cnn", "cnn", {}, optimizer="sgd", lr=0.05, log_every=25,
      faults=(FrozenByMistake("conv1"),), seed=58),
]
# fmt: on

CORPUS: list[RunSpec] = HEALTHY + FAULTY


def split(specs: list[RunSpec] = CORPUS, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """``(tuning, held_out)``: a third of each stratum (fault class, or healthy) held out."""
    strata: dict[str, list[RunSpec]] = defaultdict(list)
    for spec in specs:
        strata[spec.fault_class].append(spec)
    rng = random.Random(seed)
    held: set[str] = set()
    for name in sorted(strata):
        members = sorted(strata[name], key=lambda s: s.name)
        rng.shuffle(members)
        held.update(s.name for s in members[: math.ceil(len(members) / 3)])
    return [s for s in specs if s.name not in held], [s for s in specs if s.name in held]
