"""Frozen TensorFlow graphs written as protobuf bytes, without TensorFlow.

Essentia loads frozen ``GraphDef`` files through its bundled libtensorflow.
The test models and the benchmark graphs only need a handful of ops with
constant weights, and the GraphDef wire format for those is small and stable,
so encoding it here keeps TensorFlow (hundreds of MB, and a second copy of
libtensorflow that must never share a process with Essentia's) out of the
project. Only the fields these graphs use are encoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

DT_FLOAT = 1
DT_INT32 = 3
_DTYPES = {np.dtype(np.float32): DT_FLOAT, np.dtype(np.int32): DT_INT32}
# Any producer version that TF 2.x accepts; Essentia bundles TF 2.5.
GRAPH_PRODUCER = 808


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _int_field(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value)


def _bytes_field(number: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _key(number, 2) + _varint(len(data)) + data


def _float_field(number: int, value: float) -> bytes:
    return _key(number, 5) + struct.pack("<f", value)


def _shape(dims: Sequence[int] | None) -> bytes:
    if dims is None:
        return _int_field(3, 1)  # unknown_rank
    # A dimension of -1 is "unknown" (the batch axis); 0 is encoded as an empty Dim.
    return b"".join(_bytes_field(2, _int_field(1, d) if d else b"") for d in dims)


def _tensor(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    return (
        _int_field(1, _DTYPES[array.dtype])
        + _bytes_field(2, _shape(array.shape))
        + _bytes_field(4, array.astype(array.dtype.newbyteorder("<")).tobytes())
    )


# AttrValue fields, tagged by what they hold.
@dataclass(frozen=True)
class Attr:
    encoded: bytes

    @staticmethod
    def type(dtype: int) -> "Attr":
        return Attr(_int_field(6, dtype))

    @staticmethod
    def types(dtypes: Iterable[int]) -> "Attr":
        return Attr(_bytes_field(1, b"".join(_int_field(6, d) for d in dtypes)))

    @staticmethod
    def shape(dims: Sequence[int] | None) -> "Attr":
        return Attr(_bytes_field(7, _shape(dims)))

    @staticmethod
    def tensor(array: np.ndarray) -> "Attr":
        return Attr(_bytes_field(8, _tensor(array)))

    @staticmethod
    def boolean(value: bool) -> "Attr":
        return Attr(_int_field(5, int(value)))

    @staticmethod
    def string(value: str) -> "Attr":
        return Attr(_bytes_field(2, value))

    @staticmethod
    def ints(values: Iterable[int]) -> "Attr":
        return Attr(_bytes_field(1, b"".join(_int_field(3, v) for v in values)))


@dataclass
class Graph:
    """A growing list of nodes; helpers return the name of what they add."""

    nodes: list[bytes] = field(default_factory=list)
    names: set[str] = field(default_factory=set)

    def add(self, name: str, op: str, inputs: Sequence[str] = (), **attrs: Attr) -> str:
        if name in self.names:
            raise ValueError(f"duplicate node name {name!r}")
        self.names.add(name)
        body = _bytes_field(1, name) + _bytes_field(2, op)
        body += b"".join(_bytes_field(3, i) for i in inputs)
        for key in sorted(attrs):
            body += _bytes_field(5, _bytes_field(1, key) + _bytes_field(2, attrs[key].encoded))
        self.nodes.append(body)
        return name

    def placeholder(self, name: str, shape: Sequence[int]) -> str:
        return self.add(name, "Placeholder", dtype=Attr.type(DT_FLOAT), shape=Attr.shape(shape))

    def const(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        if array.dtype == np.int64:
            array = array.astype(np.int32)
        return self.add(name, "Const", dtype=Attr.type(_DTYPES[array.dtype]), value=Attr.tensor(array))

    def unary(self, op: str, name: str, x: str) -> str:
        return self.add(name, op, [x], T=Attr.type(DT_FLOAT))

    def binary(self, op: str, name: str, a: str, b: str) -> str:
        return self.add(name, op, [a, b], T=Attr.type(DT_FLOAT))

    def matmul(self, name: str, x: str, weights: np.ndarray) -> str:
        w = self.const(name + "/kernel", weights)
        return self.add(name, "MatMul", [x, w], T=Attr.type(DT_FLOAT),
                        transpose_a=Attr.boolean(False), transpose_b=Attr.boolean(False))

    def bias_add(self, name: str, x: str, bias: np.ndarray) -> str:
        b = self.const(name + "/bias", bias)
        return self.add(name, "BiasAdd", [x, b], T=Attr.type(DT_FLOAT),
                        data_format=Attr.string("NHWC"))

    def dense(self, name: str, x: str, weights: np.ndarray, bias: np.ndarray) -> str:
        """``x @ weights + bias``; the sum is the node called ``name``."""
        return self.bias_add(name, self.matmul(name + "/MatMul", x, weights), bias)

    def mean(self, name: str, x: str, axes: Sequence[int], keep_dims: bool = False) -> str:
        axes_node = self.const(name + "/axes", np.asarray(axes, dtype=np.int32))
        return self.add(name, "Mean", [x, axes_node], T=Attr.type(DT_FLOAT),
                        Tidx=Attr.type(DT_INT32), keep_dims=Attr.boolean(keep_dims))

    def reshape(self, name: str, x: str, shape: Sequence[int]) -> str:
        s = self.const(name + "/shape", np.asarray(shape, dtype=np.int32))
        return self.add(name, "Reshape", [x, s], T=Attr.type(DT_FLOAT), Tshape=Attr.type(DT_INT32))

    def conv2d(self, name: str, x: str, kernel: np.ndarray, stride: int = 1, *, depthwise: bool = False) -> str:
        k = self.const(name + "/kernel", kernel)
        op = "DepthwiseConv2dNative" if depthwise else "Conv2D"
        return self.add(name, op, [x, k], T=Attr.type(DT_FLOAT), strides=Attr.ints([1, stride, stride, 1]),
                        padding=Attr.string("SAME"), data_format=Attr.string("NHWC"),
                        dilations=Attr.ints([1, 1, 1, 1]))

    def max_pool(self, name: str, x: str, size: int = 2) -> str:
        return self.add(name, "MaxPool", [x], T=Attr.type(DT_FLOAT), ksize=Attr.ints([1, size, size, 1]),
                        strides=Attr.ints([1, size, size, 1]), padding=Attr.string("SAME"),
                        data_format=Attr.string("NHWC"))

    def identity_n(self, name: str, inputs: Sequence[str]) -> str:
        """One op with several outputs, read as ``name:0``, ``name:1``, ..."""
        return self.add(name, "IdentityN", inputs, T=Attr.types([DT_FLOAT] * len(inputs)))

    def serialize(self) -> bytes:
        versions = _bytes_field(4, _int_field(1, GRAPH_PRODUCER))
        return b"".join(_bytes_field(1, n) for n in self.nodes) + versions


def glorot(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Random weights scaled so activations neither vanish nor saturate."""
    fan_in = int(np.prod(shape[:-1])) or 1
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
