"""The tasks: each module holds one task's data, prototype features, loss, predictions, score.

* ``classification``: ViT image classification (data: ``images``);
* ``segmentation``: SAM segmentation with box prompts;
* ``report``: report → impression generation with Llama;
* ``images``: labeled image datasets by URI; ``sites``: the one built-in acquisition-site
  renderer the image tasks share.
"""
