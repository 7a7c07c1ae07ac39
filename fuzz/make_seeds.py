#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_bnorm (fuzz/corpus/): one small input per
operation x layout x flags, and one per argument rule, aliasing case and kind
of data. The byte format is decode() in fuzz_bnorm.cpp, described in
fuzz/README.md; bytes past a seed's end come from a generator seeded by the
seed, so most seeds stop after the headers.

    python3 fuzz/make_seeds.py fuzz/corpus
"""
import os
import struct
import sys

OPS = ["training", "inference", "backward", "running_stats", "chain", "split_training",
       "split_backward", "status_string", "isa", "last_error"]
NCHW, NHWC = 0, 7            # layout byte: 0-6 NCHW, 7-13 NHWC
BAD_LAYOUT = 15              # then one byte: 2, -1, INT32_MIN, INT32_MAX
SMALL, LARGE, HOSTILE = 0, 2, 3
# hostile_size() table indices
H = {"0": 0, "1": 1, "-1": 2, "2": 3, "7": 4, "64": 5, "INT64_MAX": 6, "INT64_MIN": 7,
     "3037000500": 8, "2^31": 9, "2^32": 10, "PTRDIFF_MAX/4": 11, "PTRDIFF_MAX/4+1": 12,
     "2^62": 13, "-2^40": 14}
# decode_eps() table indices
EPS = {"1e-5": 0, "0": 1, "-0": 2, "1e-3": 3, "1": 4, "0.1": 5, "denormal": 6, "1e30": 7,
       "inf": 8, "-1e-30": 9, "-1": 10, "nan": 11, "-nan": 12, "FLT_MAX": 13}
RELU, GLOBAL = 1, 2
# alias byte
SEPARATE, IN_PLACE, PARTIAL, DY_IS_X, DX_X = 0, 4, 5, 6, 7
# decode_momentum() table indices
MOM = {"0.1": 0, "0": 1, "1": 2, "0.5": 3, "-0": 4, "denormal": 5, "0.9": 6, "0.01": 7,
       "-1e-30": 8, "1+ulp": 9, "nan": 10, "inf": 11, "-inf": 12, "-1": 13, "2": 14}
# count byte: 0 n*spatial, 1 two, 2 one, 3 zero, 4 minus one, 5 three, 6 INT64_MAX


def value_header(mode=0, offset=0, scale=0):
    """mode 0 affine, 1 affine with specials, 2 raw floats, 3 constant;
    offset index into {0, 0, 1, -3, 100, 1e4, 1e6, -1e18};
    scale index into {1, 1/16, 1/1024, 1e3, 1e-20, 1e15, 0.5, 3}."""
    return (mode << 6) | (offset << 3) | scale


GAMMA = value_header(0, 2, 1)    # 1 + (b - 128)/16
PLAIN = value_header(0, 0, 1)    # (b - 128)/16
VAR = value_header(0, 2, 2)      # |1 + (b - 128)/1024|
DEFAULT_HEADERS = [GAMMA, PLAIN, PLAIN, VAR, PLAIN, VAR, PLAIN, PLAIN]


def case(op, layout=NCHW, size=SMALL, n=3, c=5, spatial=7, hostile=None, eps="1e-5", flags=0,
         nulls=None, optional_nulls=0, alias=SEPARATE, pick=0, misalign=0, momentum="0.1",
         count=0, parts=1, corrupt=0, apply_count=False, headers=None, data=b"",
         raw_layout=None, bad_layout=0, raw_flags=None):
    b = bytearray([OPS.index(op)])
    if raw_layout is not None:
        b += bytes([14]) + struct.pack("<i", raw_layout)
    elif layout == BAD_LAYOUT:
        b += bytes([BAD_LAYOUT, bad_layout])
    else:
        b.append(layout)
    if hostile is not None:
        b.append(HOSTILE)
        b += bytes(H[v] for v in hostile)
    else:
        b += bytes([size, n, c - 1]) + struct.pack("<H", spatial)
    b.append(EPS[eps])
    if raw_flags is not None:
        b += bytes([6]) + struct.pack("<I", raw_flags)
    else:
        b.append(flags)
    if nulls is not None:
        b += bytes([0]) + struct.pack("<H", nulls)     # any pointer parameter
    else:
        b += bytes([1, optional_nulls])                # optional ones only
    b.append(alias)
    b += struct.pack("<HH", pick, misalign)
    b.append(MOM[momentum])
    b.append(count)
    corrupt_bits = 0 if corrupt == 0 else corrupt + 4
    b.append((parts - 1) | (corrupt_bits << 2) | ((0 if apply_count else 1) << 5))
    b += bytes(headers or DEFAULT_HEADERS)
    b += data
    return bytes(b)


def seeds():
    out = {}
    layouts = {"nchw": NCHW, "nhwc": NHWC}
    flag_sets = {"plain": 0, "relu": RELU, "global": GLOBAL, "relu_global": RELU | GLOBAL}
    # Every operation with every flag combination, the layouts alternating.
    for op in OPS[:7]:
        for i, (fname, flags) in enumerate(flag_sets.items()):
            lname, layout = list(layouts.items())[i % 2]
            out[f"{op}-{lname}-{fname}"] = case(op, layout, flags=flags)
    for op in OPS[7:]:
        out[op] = case(op)

    # Shapes that reach every tail and every path of the operators.
    for op in ("training", "backward", "inference"):
        out[f"{op}-nhwc-c65"] = case(op, NHWC, n=4, c=65, spatial=3)
        out[f"{op}-nhwc-c17-rows100"] = case(op, NHWC, n=10, c=17, spatial=10)
        out[f"{op}-nchw-spatial1"] = case(op, NCHW, n=13, c=9, spatial=1)
        out[f"{op}-nchw-spatial4100"] = case(op, NCHW, size=LARGE, n=2, c=1, spatial=4100)
        out[f"{op}-nchw-threads-c3"] = case(op, NCHW, size=LARGE, n=16, c=3, spatial=2048)
        out[f"{op}-nchw-threads-c16"] = case(op, NCHW, size=LARGE, n=8, c=16, spatial=1000)
        out[f"{op}-nhwc-threads"] = case(op, NHWC, size=LARGE, n=32, c=40, spatial=100)
        out[f"{op}-empty-n0"] = case(op, NCHW, n=0, c=4, spatial=5)
        out[f"{op}-empty-spatial0"] = case(op, NCHW, n=3, c=4, spatial=0)
    out["split_training-parts3-relu"] = case("split_training", NCHW, n=7, c=6, spatial=5,
                                             flags=RELU, parts=3)
    out["split_backward-parts2-relu"] = case("split_backward", NHWC, n=5, c=9, spatial=3,
                                             flags=RELU, parts=2)
    out["split_backward-count-int64max"] = case("split_backward", n=4, c=3, spatial=2,
                                                count=6, apply_count=True)
    out["split_training-negative-count"] = case("split_training", parts=2, corrupt=1)
    out["split_training-count-overflow"] = case("split_training", parts=2, corrupt=2)
    out["split_training-k0"] = case("split_training", corrupt=3)

    # Argument rules.
    hostile = {
        "n-negative": ("-1", "2", "7"), "c-zero": ("2", "0", "7"), "spatial-negative": ("2", "2", "-1"),
        "overflow": ("INT64_MAX", "2", "2"), "too-many": ("2^31", "2^32", "2"),
        "just-too-many": ("1", "1", "PTRDIFF_MAX/4+1"), "c-too-many": ("0", "PTRDIFF_MAX/4+1", "1"),
        "n0-c-huge": ("0", "2^62", "7"), "n0-spatial-huge": ("0", "2", "INT64_MAX"),
        "n-huge-spatial0": ("INT64_MAX", "2", "0"), "n-huge-c1-spatial0": ("INT64_MAX", "1", "0"),
        "all-min": ("INT64_MIN", "INT64_MIN", "INT64_MIN"),
    }
    for name, dims in hostile.items():
        for op in ("training", "backward"):
            out[f"{op}-hostile-{name}"] = case(op, hostile=dims)
    for name in ("n0-spatial-huge", "n-huge-c1-spatial0", "c-too-many"):
        for op in ("inference", "split_training", "split_backward"):
            out[f"{op}-hostile-{name}"] = case(op, hostile=hostile[name])
    for v in range(4):
        out[f"training-bad-layout-{v}"] = case("training", BAD_LAYOUT, bad_layout=v)
    out["inference-raw-layout"] = case("inference", raw_layout=0x12345678)
    for e in ("-1e-30", "nan", "-nan", "-0", "inf", "denormal", "FLT_MAX", "0"):
        out[f"training-eps-{e}"] = case("training", eps=e)
    out["inference-eps-inf"] = case("inference", eps="inf")
    out["training-unknown-flag"] = case("training", raw_flags=0x80000001)
    out["backward-unknown-flag"] = case("backward", raw_flags=4)
    for i in range(10):   # each pointer parameter of backward NULL
        out[f"backward-null-{i}"] = case("backward", nulls=1 << i, flags=RELU)
    out["training-null-mask"] = case("training", nulls=1 << 7, flags=RELU)
    out["split_backward-null-sums-global"] = case("split_backward", nulls=3 << 7, flags=GLOBAL)
    out["backward-optional-nulls"] = case("backward", optional_nulls=0x7)
    out["training-optional-nulls"] = case("training", optional_nulls=0x3)

    # Aliasing: in place, partial overlap both ways, adjacent (disjoint).
    t = 3 * 5 * 7
    for op in ("training", "backward", "split_backward"):
        out[f"{op}-in-place"] = case(op, alias=IN_PLACE)
        out[f"{op}-overlap-after"] = case(op, alias=PARTIAL, pick=(10 << 2))
        out[f"{op}-overlap-before"] = case(op, alias=PARTIAL, pick=(10 << 2) | 2)
        out[f"{op}-adjacent"] = case(op, alias=PARTIAL, pick=((t - 1) << 2))
    out["backward-dy-is-x"] = case("backward", alias=DY_IS_X)
    out["backward-dx-is-x"] = case("backward", alias=DX_X, pick=0)
    out["backward-dx-overlaps-x"] = case("backward", alias=DX_X, pick=1 | (5 << 2))
    out["backward-misaligned"] = case("backward", misalign=0xE4E4)

    # Data: specials, offsets, constants, raw floats.
    x_special = value_header(1, 0, 1)
    out["training-nan-inf"] = case("training", headers=DEFAULT_HEADERS[:6] + [x_special, PLAIN],
                                   data=bytes(30) + bytes([250, 100, 251, 252, 253, 254, 255]))
    out["training-constant-channels"] = case(
        "training", headers=DEFAULT_HEADERS[:6] + [value_header(3, 6, 0), PLAIN])
    out["training-offset-1e6"] = case(
        "training", NHWC, headers=DEFAULT_HEADERS[:6] + [value_header(0, 6, 2), PLAIN])
    out["training-1e18"] = case("training", headers=DEFAULT_HEADERS[:6] + [value_header(0, 7, 5), PLAIN])
    # Chunks (64 NHWC rows, 4096 NCHW values) with different means: the
    # merge of their moments must carry the spread between them.
    out["training-nhwc-chunk-means"] = case(
        "training", NHWC, n=2, c=3, spatial=64,
        data=bytes(6 * 3) + bytes([120, 124, 128] * 64 + [180, 200, 220] * 64))
    out["training-nchw-chunk-means"] = case(
        "training", NCHW, size=LARGE, n=2, c=1, spatial=2100,
        data=bytes(6) + bytes([100 + i % 7 for i in range(2100)] + [200 + i % 5 for i in range(2100)]))
    out["training-tiny"] = case("training", headers=[value_header(0, 0, 4)] * 8)
    out["backward-raw-floats"] = case("backward", headers=[value_header(2, 0, 0)] * 8)
    out["inference-negative-var"] = case("inference", headers=DEFAULT_HEADERS[:3] + [value_header(2, 0, 0)] + DEFAULT_HEADERS[4:],
                                         data=bytes(15) + struct.pack("<5f", -1, -1e-6, 0, 1, float("nan")))

    # update_running_stats rules.
    for m in ("nan", "1+ulp", "-1e-30", "-0", "1"):
        out[f"running-momentum-{m}"] = case("running_stats", momentum=m)
    for cnt, name in ((1, "two"), (2, "one"), (4, "minus-one"), (6, "int64max")):
        out[f"running-count-{name}"] = case("running_stats", count=cnt)
    out["running-c-too-many"] = case("running_stats", hostile=("1", "PTRDIFF_MAX/4+1", "1"))
    out["running-c-negative"] = case("running_stats", hostile=("1", "-1", "1"))
    out["chain-nhwc-relu-c11"] = case("chain", NHWC, n=6, c=11, spatial=5, flags=RELU)
    return out


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
    os.makedirs(target, exist_ok=True)
    for name, data in sorted(seeds().items()):
        with open(os.path.join(target, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds())} seeds in {target}")


if __name__ == "__main__":
    main()
