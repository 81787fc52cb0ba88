"""Glue for hosts that need more than the Trainer mixin: one folder per host."""
