"""Builders (library side): architecture presets, composition from pretrained parts, checkpoint conversion."""
