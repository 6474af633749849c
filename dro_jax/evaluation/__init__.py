"""Measuring prompt settings on query sets: refusals and refusal log-odds per setting (`measure`), the
held-out evaluation (`evaluate`), sweeps over models (`sweep`, `sweep_output`), movement in the anchor space."""
