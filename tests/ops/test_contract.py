"""The op contract: validated configs with errors that name the field and value."""

from __future__ import annotations

import numpy as np
import pytest

from ops.base import NO_MASK, OpConfigError, Resources, identity_affine
from ops.registry import op_class, op_names


def test_every_op_has_name_version_and_a_default_or_a_named_requirement():
    needs_params = set()
    for name in op_names():
        cls = op_class(name)
        assert cls.name == name and cls.version
        try:
            cls({})
        except OpConfigError as exc:
            assert f"op {name!r}" in str(exc)
            needs_params.add(name)
    # Every model-backed op needs its model named; nothing else needs more than defaults.
    with_models = {"scene", "restyle", "outpaint", "instruct_edit", "segment_variants", "upscale", "inpaint_gan"}
    assert needs_params == {"pad", "resize", "stamp_watermark", "fit_channel"} | with_models  # fit_channel: which channel
    for name in with_models:
        assert op_class(name).model_fields == ("model",)


def test_bad_value_names_field_and_value():
    with pytest.raises(OpConfigError) as exc:
        op_class("compose")({"fill": 1.7})
    assert "'fill'" in str(exc.value) and "1.7" in str(exc.value)


def test_unknown_field_is_refused_with_its_name():
    with pytest.raises(OpConfigError, match="unknown field 'strenght'"):
        op_class("denoise")({"strenght": 3})


def test_unknown_op_lists_known_ones():
    with pytest.raises(OpConfigError, match="known ops: .*compose"):
        op_class("sharpenn")


def test_resources_are_declared_and_checked():
    assert not op_class("denoise")({}).resources.uses_gpu
    assert op_class("denoise")({}, resources=Resources(gpus=0.5)).resources.uses_gpu
    with pytest.raises(OpConfigError, match="gpus"):
        Resources(gpus=-1)


def test_setup_runs_once_lazily():
    cls = op_class("sharpen")
    calls = []

    class Counting(cls):
        def setup(self):
            calls.append(1)

    op = Counting({})
    assert calls == []
    batch = {"image": [np.zeros((8, 8, 3), np.uint8)] * 2, "mask": [NO_MASK] * 2, "affine": [identity_affine()] * 2, "seed": [0, 0]}
    op(batch)
    op(batch)
    assert calls == [1]
