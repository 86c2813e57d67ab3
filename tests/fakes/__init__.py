"""Tiny ASGI apps that stand in for real services on loopback and record what they get."""
