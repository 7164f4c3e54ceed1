"""Tests of car_backend.pipeline."""
