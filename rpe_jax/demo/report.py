"""``python -m rpe_jax.compose --demo report``: the demo on built-in radiology reports.

On first run it builds, and caches beside the classification demo:

* a byte-level BPE tokenizer and a small Llama trained in full on the train reports of two
  built-in modalities (``BASE_MODALITIES``; ``rpe_jax.tasks.report.pretrain_base``: no
  pretrained language model can be downloaded here), saved as an HF folder with its
  ``tokenizer.json``;
* a library with one LoRA per modality (``rpe_jax.tasks.report.MODALITIES``), trained
  through the task contract (``ReportTask.train``, impression tokens only) and stored with
  its prototype (the mean last hidden state over the findings tokens) and its task.

Then it holds ``mri_brain`` out, weighs and composes the other modalities' adapters with
every strategy from the held-out findings alone, and prints the ROUGE-L F1 of the greedy
impressions next to the base and the modality's own adapter.
"""

from __future__ import annotations

import sys

from rpe_jax import demo

MEMBERS = ("ct_chest", "mri_brain", "us_abdomen", "xr_knee")
HELD_OUT = "mri_brain"
BASE_MODALITIES = ("ct_chest", "us_abdomen")
BASE_MODEL = "rpe-demo-llama"
ENCODER = "rpe-demo-llama/findings-mean"
LAM2 = 1.0           # the seeds' language default
MAX_NEW_TOKENS = 20


def _size() -> dict:
  if demo.tiny():
    return {"vocab": 300, "hidden": 32, "layers": 1, "base_steps": 10, "adapter_epochs": 1,
            "rank": 2}
  return {"vocab": 512, "hidden": 64, "layers": 2, "base_steps": 300, "adapter_epochs": 12,
          "rank": 4}


def _uri(modality: str) -> str:
  return f"reports:{modality}"


def cache_folder():
  return demo.recipe_folder("report", (MEMBERS, BASE_MODALITIES, demo.SEED,
                                       sorted(_size().items())))


def base():
  """The demo's frozen Llama and tokenizer (``TaskModel``), built once, then cached."""
  from models import hf
  from rpe_jax.tasks.registry import task_model
  folder = cache_folder() / "base"
  if not (folder / "config.json").exists():
    from rpe_jax.tasks import report

    def build(tmp):
      from rpe_jax.tasks.report_data import load
      size = _size()
      train = {m: list(load(_uri(m), "train", seed=demo.SEED).reports) for m in MEMBERS}
      corpus = [text for reports in train.values() for r in reports
                for text in (r.findings, r.impression)]
      corpus += [report.format_prompt("", t) for t in report.TEMPLATES]
      codec = report.train_tokenizer(corpus, size["vocab"])
      print(f"building the demo's Llama base ({size['base_steps']} steps) ...",
            file=sys.stderr)
      model = report.pretrain_base(codec, [r for m in BASE_MODALITIES for r in train[m]],
                                   hidden=size["hidden"], layers=size["layers"],
                                   steps=size["base_steps"], seed=demo.SEED)
      hf.save(model, tmp)
      report.save_codec(codec, tmp)

    demo._build_atomically(folder, build)
  return task_model(hf.load(folder), folder)


def library(tm):
  """The demo library: one LoRA per member with its prototype (built once)."""
  from rpe_jax.tasks.contract import TrainOptions
  from rpe_jax.tasks.report import ReportTask
  size = _size()
  options = TrainOptions(rank=size["rank"], epochs=size["adapter_epochs"],
                         seed=demo.SEED)
  return demo.member_library(sys.modules[__name__], ReportTask(), tm, options)


def run(held_out: str = HELD_OUT, k: int = 4, lam1: float = 1.0, lam2: float = LAM2,
        target: str | None = None, per_sample: bool = False) -> dict:
  from rpe_jax.tasks.report import ReportTask
  return demo.run_member_demo(sys.modules[__name__], ReportTask(), held_out=held_out,
                              k=k, lam1=lam1, lam2=lam2, target=target, per_sample=per_sample,
                              member="modality", members="modalities",
                              predict_options={"max_new_tokens": MAX_NEW_TOKENS})


def main(argv) -> int:
  return demo.member_demo_main(
      sys.modules[__name__], argv,
      description="The report demo: a small Llama and one LoRA per built-in modality.",
      member="modality", members="modalities", example=None)
