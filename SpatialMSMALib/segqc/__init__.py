"""Segmentation quality control: corruptions with known severity, model-space tissue label
maps of the benchmark cohort, and baseline QC scores (GNSM on label maps is to come)."""
