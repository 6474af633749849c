"""Measuring prompt settings on query sets: one setting on one set (`measure`), every setting on the held-out
sets (`evaluate`, the engine), the same over models (`sweep`, `sweep_output`), the one row type and its tables
(`rows`), reply quality (`quality`), movement in the anchor space (`movement`), win rates on everyday instructions
(`helpfulness`) and the decline judge's agreement with labelled replies (`judge_agreement`)."""
