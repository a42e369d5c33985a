"""Shared plumbing used by every stage: user-facing errors, embedded paths, lazy
policyengine-us access and h5 dataset I/O. Nothing here knows about a stage."""
