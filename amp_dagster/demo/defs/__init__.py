"""The demo's dg defs folder: one sub-folder per dataset, each with the ``defs.yaml`` of its amp pipelines."""
