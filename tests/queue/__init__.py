"""Tests of car_backend.queue."""
