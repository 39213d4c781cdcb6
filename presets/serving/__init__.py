"""Serving machinery shared by every model family: app, validation, scheduler, engine loop, launcher."""
