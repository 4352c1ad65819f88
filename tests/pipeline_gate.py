"""Lift exactly one gate of transformers' any-to-any pipeline: its torchvision requirement.

`AnyToAnyPipeline.__init__` calls `requires_backends(self, "torchvision")` for every model that takes images or
video, although nothing else in the pipeline uses torchvision. The PyPI torchvision wheels do not import beside this
machine's CPU torch, so CI lifts that one requirement (every other backend check still runs); where torchvision
imports (the GPU machines) nothing is patched and the real pipeline runs.

Imports only transformers: fresh-process tests import it where `modeling_mmllm` must stay unimportable.
"""

import transformers.pipelines.any_to_any as any_to_any


def torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a wheel built for another torch failing while it registers its operators
        return False
    return True


def without_torchvision(requires_backends):
    """`requires_backends` with "torchvision" dropped from the backends it checks; everything else is passed on."""

    def check(obj, backends):
        backends = [backends] if isinstance(backends, str) else list(backends)
        remaining = [backend for backend in backends if backend != "torchvision"]
        if remaining:
            requires_backends(obj, remaining)

    check.lifted = "torchvision"
    return check


def lift_torchvision_gate(monkeypatch=None) -> bool:
    """Patch the any-to-any pipeline's `requires_backends` when torchvision does not import; True if it patched.

    With a pytest `monkeypatch`, the patch is undone with it; without one (a child process) it stays.
    """
    if torchvision_importable():
        return False
    patched = without_torchvision(any_to_any.requires_backends)
    if monkeypatch is None:
        any_to_any.requires_backends = patched
    else:
        monkeypatch.setattr(any_to_any, "requires_backends", patched)
    return True
