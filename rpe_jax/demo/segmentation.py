"""``python -m rpe_jax.compose --demo segmentation``: the demo on built-in organ images.

On first run it builds, and caches beside the classification demo:

* a tiny SAM base trained in full on the built-in organ family's ``clean`` site
  (``rpe_jax.tasks.segmentation.pretrain_base``: no pretrained SAM can be downloaded here),
  on phantoms of another seed than the library's and the target's, so that it has seen none
  of their images;
* a library with one LoRA per member site (``MEMBERS``), trained through the task contract
  (``SegmentationTask.train``) and stored with its prototype (the mean-pooled image
  embedding of the site's train images under the frozen base) and its task.

Then it holds ``scanner`` out, weighs and composes the other sites' adapters with every
strategy from the held-out images alone, and prints the held-out mean DICE of each next to
the base and the site's own adapter. Prompts are boxes from the ground-truth masks, the
usual SAM evaluation protocol: the weights never see a mask, the prompts do.
"""

from __future__ import annotations

import sys

from rpe_jax import demo

MEMBERS = ("clean", "blur", "lowcontrast", "noisy", "bias", "scanner")
HELD_OUT = "scanner"
BASE_SITES = ("clean",)
BASE_MODEL = "rpe-demo-sam"
ENCODER = "rpe-demo-sam/mean"
PROMPT = "box"
LAM2 = 10.0          # the seeds' vision default
BASE_SEED = 1        # the base's phantoms: not the members' (seed 0)


def _size() -> dict:
  if demo.tiny():
    return {"image_size": 16, "base_steps": 10, "adapter_epochs": 1, "rank": 2}
  return {"image_size": 32, "base_steps": 200, "adapter_epochs": 13, "rank": 4}


def _uri(site: str) -> str:
  return f"sites:organs/{site}:{_size()['image_size']}"


def cache_folder():
  return demo.recipe_folder("segmentation", (MEMBERS, BASE_SITES, PROMPT, demo.SEED,
                                             BASE_SEED, sorted(_size().items())))


def base():
  """The demo's frozen SAM (``TaskModel``), trained once and then loaded from the cache."""
  from models import hf
  from rpe_jax.tasks.registry import task_model
  folder = cache_folder() / "base"
  if not (folder / "config.json").exists():
    from rpe_jax.tasks.segmentation import pretrain_base

    def build(tmp):
      size = _size()
      print(f"building the demo's SAM base ({size['base_steps']} steps) ...", file=sys.stderr)
      model = pretrain_base(BASE_SITES, size=size["image_size"], steps=size["base_steps"],
                            prompt=PROMPT, seed=BASE_SEED)
      hf.save(model, tmp)

    demo._build_atomically(folder, build)
  return task_model(hf.load(folder), folder)


def library(tm):
  """The demo library: one LoRA per member with its prototype (built once)."""
  from rpe_jax.tasks.contract import TrainOptions
  from rpe_jax.tasks.segmentation import SegmentationTask
  size = _size()
  options = TrainOptions(rank=size["rank"], epochs=size["adapter_epochs"],
                         prompt=PROMPT, seed=demo.SEED)
  return demo.member_library(sys.modules[__name__], SegmentationTask(), tm, options)


def run(held_out: str = HELD_OUT, k: int = 4, lam1: float = 1.0, lam2: float = LAM2,
        target: str | None = None, per_sample: bool = False) -> dict:
  from rpe_jax.tasks.segmentation import SegmentationTask
  return demo.run_member_demo(sys.modules[__name__], SegmentationTask(), held_out=held_out,
                              k=k, lam1=lam1, lam2=lam2, target=target, per_sample=per_sample,
                              member="site", members="sites",
                              predict_options={"prompt": PROMPT}, prompt=PROMPT)


def main(argv) -> int:
  return demo.member_demo_main(
      sys.modules[__name__], argv,
      description="The segmentation demo: a tiny SAM and one LoRA per built-in organ site.",
      member="site", members="sites", example="scanner+blur+noisy")
