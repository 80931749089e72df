"""fit_channel: pad, scale and centre an image so a marketplace channel's rules pass.

It composes the product (its mask, or the non-white pixels when there is none) onto the
channel's canvas (`fit:` in `ops/channels/<channel>.yaml`: size, aspect, fill, background)
through the same code as `compose`. It never enlarges the product more than `max_upscale`:
past that it fails the row and says to put `upscale` first, because a blurry enlargement
would pass the size rule and still be a bad listing image.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
from pydantic import Field

from ops.base import Item, Op, OpConfig, OpInputError, has_mask
from ops.compliance import NON_WHITE, channels
from ops.compose import Compose
from ops.registry import register


class FitChannelConfig(OpConfig):
    channel: Literal["amazon_main", "google_merchant", "shopify"]
    max_upscale: float = Field(2.0, ge=1, le=8, description="refuse to enlarge the product more than this (use upscale first)")


@register
class FitChannel(Op):
    name = "fit_channel"
    version = "1"
    Config = FitChannelConfig

    @functools.cached_property
    def _compose(self) -> Compose:
        return Compose({**channels()[self.config.channel].fit, "max_upscale": self.config.max_upscale})

    def apply(self, item: Item) -> Item:
        if not has_mask(item.mask):
            # No cut-out: the product is what is not background-white.
            found = (item.image.min(axis=2) < NON_WHITE).astype(np.uint8) * 255
            if not found.any():
                raise OpInputError("fit_channel: no product found (the image is all white)")
            item = item.with_mask(found)
        try:
            return self._compose.apply(item)
        except OpInputError as exc:
            raise OpInputError(f"fit_channel {self.config.channel}: {exc}; add an upscale step before fit_channel") from None
