"""The main job on the embedded default (library side): `mmllm quickstart` and its any-to-any stage."""
