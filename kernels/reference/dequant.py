"""Reference dequantization: a QuantizedWeight back to the values it stands for. The specification
the fast CPU dequantize and quantized matmuls are tested against."""
from __future__ import annotations

from torch import Tensor

from llmc.quantized.formats import QuantizedWeight, decode, grouped, ungrouped


def dequantize(qw: QuantizedWeight) -> Tensor:
    """QuantizedWeight -> fp32 [N, K]: the codes decoded, (code - zero) * scale, with the scale and
    zero point of each channel, group or the whole tensor."""
    n, k = qw.shape
    fmt = qw.fmt
    codes = fmt.number.unpack(qw.data, k)
    if fmt.granularity == "group":
        zero = None if qw.zero is None else qw.zero[..., None]
        return ungrouped(decode(grouped(codes.float(), fmt.group_size), qw.scale[..., None], zero), k)
    scale = qw.scale if fmt.granularity == "channel" else qw.scale.reshape(())
    return decode(codes, scale, qw.zero)


def dequantize_rows(qw: QuantizedWeight, rows: Tensor) -> Tensor:
    """The fp32 values of rows `rows` of a channel- or group-wise QuantizedWeight (an embedding
    table's looked-up tokens), without decoding the others."""
    if qw.fmt.granularity == "tensor":
        return dequantize(qw)[rows]
    return dequantize(qw.rows(rows))
