"""Reference dequantization: a QuantizedWeight back to the values it stands for. The specification
the fast CPU dequantize and quantized matmuls are tested against."""
from __future__ import annotations

from torch import Tensor

from llmc.quantized.formats import QuantizedWeight, grouped, ungrouped


def dequantize(qw: QuantizedWeight) -> Tensor:
    """QuantizedWeight -> fp32 [N, K]: (code - zero) * scale, per channel, group or tensor."""
    n, k = qw.shape
    fmt = qw.fmt
    vals = fmt.number.unpack(qw.data, k).float()
    if fmt.granularity == "group":
        g = grouped(vals, fmt.group_size)
        if qw.zero is not None:
            g = g - qw.zero.float()[..., None]
        return ungrouped(g * qw.scale[..., None], k)
    if qw.zero is not None:
        vals = vals - qw.zero.float()
    return vals * qw.scale if fmt.granularity == "channel" else vals * qw.scale.reshape(())
