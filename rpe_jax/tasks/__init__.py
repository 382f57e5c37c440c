"""The tasks, each behind the same small contract (data, features, loss, predict, score).

* ``classification``: ViT image classification;
* ``segmentation``: SAM segmentation with box prompts;
* ``report``: report → impression generation with Llama;
* ``sites``: the built-in acquisition-shift renderer the image tasks share.
"""
