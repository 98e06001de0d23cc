"""Evaluation: attribute estimators and metrics over generated or rendered audio."""
