#!/usr/bin/env python3
"""Checks that a PNG rendered from `cllm plot` is not blank: enough non-white pixels, and
pixels of each series colour (train loss blue, validation red, other panels green).

Standard library only (CI may not have Pillow): decodes 8-bit RGB/RGBA PNGs with zlib.
Usage: png_check.py FILE.png
"""
import struct
import sys
import zlib

SERIES = {"train loss": (31, 119, 180), "validation loss": (214, 39, 40), "other panels": (44, 160, 44)}


def decode(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unsupported PNG: {header}"
    bpp = 4 if color == 6 else 3
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return width, height, [tuple(r[i:i + 3]) for r in rows for i in range(0, stride, bpp)]


def main():
    width, height, pixels = decode(sys.argv[1])
    non_white = sum(1 for p in pixels if p != (255, 255, 255))
    share = non_white / len(pixels)
    assert 0.01 < share < 0.6, f"{share:.1%} of the pixels are not white: blank or flooded"
    distinct = len(set(pixels))
    assert distinct > 16, f"only {distinct} distinct colours"
    for name, rgb in SERIES.items():
        near = sum(1 for p in pixels if all(abs(p[k] - rgb[k]) < 40 for k in range(3)))
        assert near > 50, f"{name}: {near} pixels of its colour {rgb}"
    print(f"PNG OK: {width}x{height}, {share:.1%} non-white, {distinct} colours")


if __name__ == "__main__":
    main()
