"""The tasks: each module holds one task's data, prototype features, loss, predictions, score.

* ``classification``: ViT image classification (data: ``images``);
* ``segmentation``: SAM segmentation with box prompts (data: ``seg_data``);
* ``report``: report → impression generation with Llama (data: ``report_data``);
* ``images``, ``seg_data``, ``report_data``: each task's datasets by URI (one
  ``DatasetError``); ``sites``: the one built-in acquisition-site renderer the image tasks
  share.
"""
