"""Tests of car_backend.review."""
