"""The one runner that exposes tensors: a copy of the model with the requested outputs."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_squeeze import zoo
from onnx_squeeze.calibration.runner import TensorRunner, expose
from onnx_squeeze.pipeline import compress
from tests.helpers import random_feeds, run


def test_exposed_copy_keeps_only_the_nodes_its_outputs_need():
    """onnxruntime runs every node of a graph: a tensor near the input must not cost a whole
    forward pass. The original keeps all its nodes and outputs."""
    model = compress(zoo.small("resnet18"), compare=False).model
    nodes = list(model.graph)
    early = nodes[1].outputs[0].name
    copy, fed = expose(model, [early])
    assert fed == [] and [v.name for v in copy.graph.outputs] == [early]
    assert len(list(copy.graph)) == 2 < len(nodes) == len(list(model.graph))
    assert len(copy.graph.initializers) < len(model.graph.initializers)
    feed = random_feeds(model, 1)[0]
    found = TensorRunner(model, [early, model.graph.outputs[0].name])(feed)
    np.testing.assert_allclose(found[model.graph.outputs[0].name], run(model, feed)[0], rtol=1e-4)
    assert found[early].shape[0] == feed[model.graph.inputs[0].name].shape[0]


def test_a_runner_used_as_a_context_manager_drops_its_session_on_exit():
    """Inside the block it computes what a plain run does; after it, the session is gone (its
    memory handed back) and a call is an error, not a silent empty result."""
    model = zoo.small("resnet18")
    feed = random_feeds(model, 1)[0]
    name = model.graph.outputs[0].name
    with TensorRunner(model, [name]) as runner:
        np.testing.assert_allclose(runner(feed)[name], run(model, feed)[0], rtol=1e-4)
    assert runner.session is None
    with pytest.raises(RuntimeError, match="after close"):
        runner(feed)
