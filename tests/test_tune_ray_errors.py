"""A Ray cluster that cannot be reached or started is a one-line usage error, not a crash."""

from __future__ import annotations

import pytest

from onnx_squeeze.errors import SettingsError


def test_an_unreachable_ray_cluster_is_a_settings_error(monkeypatch):
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed (pip install 'onnx-squeeze[ray]')"
    )
    from onnx_squeeze.tune.executors import RayExecutor

    def unreachable(*args, **kwargs):
        raise ConnectionError("Could not connect to ray://head:10001\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(SettingsError) as raised:
        RayExecutor("ray://head:10001")
    message = str(raised.value)
    assert "ray://head:10001" in message and "Could not connect" in message
    assert "\n" not in message
