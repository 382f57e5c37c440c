"""Running on several devices and hosts.

* ``sharding``: named meshes, partition specs from a model config's rules, placement;
* ``sharded_ops``: exact composition, TSQR re-truncation and the weight solve on a mesh;
* ``distributed``: joining a multi-host run, the ``--mesh`` flags, sharded checkpoints.
"""
