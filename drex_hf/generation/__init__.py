"""Decoding: settings shared by every decoder, and the reference per-token early-exit decoder."""
