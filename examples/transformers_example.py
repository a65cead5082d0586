"""Hugging Face Trainer + gradguard on a tiny GPT-2 built from a config (nothing downloaded).

The callback is added as usual. ``monitor_only=False`` hands the Trainer's clipping to
gradguard: ``max_grad_norm=1.0`` becomes ``chain(SkipNonFinite(), ClipNorm(1.0))``, so
what is clipped stays the same and non-finite steps are skipped; without it gradguard
would only monitor (pre-clip norms) while the Trainer clips. Its metrics
(``gradguard/total_norm``, ``gradguard/skipped``, ...) are in every log line, and in
TensorBoard, W&B or MLflow with ``report_to``.

    python examples/transformers_example.py [OUTPUT_DIR]
"""

import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradguard.integrations.transformers import GradGuardTrainerCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 16, vocab: int = 128) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(output_dir: str) -> None:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=128,
        n_positions=16,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        max_grad_norm=1.0,  # kept: gradguard clips there
        logging_steps=4,
        report_to=[],  # e.g. ["tensorboard"]: gradguard's metrics go there too
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=RandomTokens(),
        callbacks=[GradGuardTrainerCallback(monitor_only=False, health=False)],
    )
    trainer.train()
    for row in trainer.state.log_history:
        if "gradguard/total_norm" in row:
            print(
                f"step {row['step']}: loss {row['loss']:.3f}  "
                f"trainer grad_norm {row['grad_norm']:.3f}  "
                f"gradguard total_norm {row['gradguard/total_norm']:.3f}  "
                f"clip_coef {row['gradguard/clip_coef']:.3f}  "
                f"skipped {int(row['gradguard/skipped'])}"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gradguard-hf-"))
